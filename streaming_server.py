"""vLLM's OpenAI-compatible streaming server, with a JSON `/health`, a classroom page and defaults for a laptop CPU.

This is vLLM's own server, not a copy: the app comes from vLLM's app builder and is served by vLLM's launcher
(socket set-up, SSL, Unix sockets, the engine-death watchdog, signal handling). What this project adds runs
inside this process and lives in `streaming_tutorial/server/`; `main()` below calls it in order. Every vLLM
flag passes through unchanged.

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

import os
import sys

try:
    import uvloop
    from vllm.entrypoints.launchers import launcher
    from vllm.entrypoints.launchers.api_server import entry
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args
    from vllm.entrypoints.serve.exception_handling.handlers import vllm_error as vllm_error_handler
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args, init_logger
except ImportError as error:
    sys.exit(f"error: vLLM is not importable from {sys.executable} ({error}); "
             "run `make setup`, then `make serve` or `.venv/bin/python streaming_server.py`.")

from streaming_tutorial.model import DEFAULT_MODEL_DIR, ModelPreparationError, prepare
from streaming_tutorial.server.app import create_app, load_keyring
from streaming_tutorial.server.args import parse_args
from streaming_tutorial.server.compile_cache import let_inductor_artifacts_load
from streaming_tutorial.server.cpu_defaults import (
    apply_cpu_env_defaults,
    engine_core_env_defaults,
    few_cores,
    quiet_uniprocess_warnings,
    running_on_cpu,
)
from streaming_tutorial.server.restart_hooks import install_restart_hooks, last_line
from streaming_tutorial.server.seeded_sampling import let_seeded_prefill_chunks_rewind
from streaming_tutorial.server.shutdown import EngineDeathWatch, adopt_orphans, stop_leftover_processes
from streaming_tutorial.server.startup_signals import StartupGuard
from streaming_tutorial.server.top_p import let_top_p_skip_the_full_sort

logger = init_logger("vllm.streaming_server")  # under "vllm", so it gets vLLM's log format and handler

if running_on_cpu():
    # At import, not in main(): vLLM's engine and worker processes are spawned, and spawning re-imports this
    # file in them (as __mp_main__), so this also runs in the process that loads the compiled model.
    let_inductor_artifacts_load()
    quiet_uniprocess_warnings()
    if __name__ == "__mp_main__":  # vLLM's engine (or worker) process, where the model samples
        let_seeded_prefill_chunks_rewind()
        let_top_p_skip_the_full_sort()

# Seconds the HTTP server waits for open connections once the engine has stopped (see main()).
HTTP_SHUTDOWN_GRACE_S = 3


def main(argv: list[str] | None = None) -> None:
    cli_env_setup()
    on_cpu = running_on_cpu()
    if on_cpu:
        apply_cpu_env_defaults()  # 1. measured CPU defaults (server/cpu_defaults.py)
    args = parse_args(argv)  # 2. vLLM's flags, plus ours, with this server's defaults (server/args.py)
    if args.distributed_executor_backend == "uni" and on_cpu:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # else vLLM's CPU platform replaces uni with mp
        if few_cores():
            os.environ.update(engine_core_env_defaults())  # inherited by the EngineCore, which vLLM spawns
    configure_logging_from_args(args)
    validate_parsed_serve_args(args)
    load_keyring(args)  # 3. API keys by name: a malformed keys file stops here, before the engine loads
    if args.model == str(DEFAULT_MODEL_DIR):
        try:
            prepare(DEFAULT_MODEL_DIR)  # 4. the bundled model, prepared once and verified (streaming_tutorial/model.py)
        except ModelPreparationError as error:
            sys.exit(f"error: {error}")
    # 5. Our routes and middlewares on vLLM's app (server/app.py): vLLM's serve path builds its app with the
    # module-level `build_app`; pointing that name at `create_app` adds ours and keeps everything else.
    entry.build_app = create_app
    # 6. Stopping stops everything, and an engine death shows in the exit code (server/shutdown.py), or a new
    # engine starts in its place with --restart-engine (server/engine_restart.py).
    adopt_orphans()
    death = EngineDeathWatch()
    death.install(launcher, vllm_error_handler)
    install_restart_hooks(launcher, vllm_error_handler)
    # 7. SIGTERM or Ctrl-C while starting stops every process at once (server/startup_signals.py); once the
    # server serves, vLLM's graceful shutdown takes over. Installed again just before the engine starts, since
    # vLLM's run_server replaces the SIGTERM handler. (Until here no child process exists.)
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
