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
    from vllm.entrypoints.launchers.api_server import entry
    from vllm.logger import configure_logging_from_args, init_logger

    from streaming_tutorial.server import seam  # every vLLM internal this server replaces (server/seam.py)

    cli_env_setup, validate_parsed_serve_args = seam.cli_env_setup(), seam.cli_args("validate_parsed_serve_args")
except ImportError as error:
    sys.exit(f"error: vLLM is not importable from {sys.executable} ({error}); "
             "run `make setup`, then `make serve` or `.venv/bin/python streaming_server.py`.")

from streaming_tutorial.model import DEFAULT_MODEL_DIR, ModelPreparationError, prepare
from streaming_tutorial.server.app import load_keyring
from streaming_tutorial.server.args import parse_args
from streaming_tutorial.server.cpu_defaults import (
    apply_cpu_env_defaults,
    engine_core_env_defaults,
    few_cores,
    quiet_uniprocess_warnings,
    running_on_cpu,
)
from streaming_tutorial.server.restart_hooks import last_line
from streaming_tutorial.server.shutdown import EngineDeathWatch, adopt_orphans, stop_leftover_processes
from streaming_tutorial.server.startup_signals import StartupGuard

logger = init_logger("vllm.streaming_server")  # under "vllm", so it gets vLLM's log format and handler

if running_on_cpu():
    # At import, not in main(): vLLM's engine and worker processes are spawned, and spawning re-imports this
    # file in them (as __mp_main__), so this also runs in the process that loads the compiled model. The seam
    # decides which of its CPU fixes hold on this vLLM (the compiled-model cache here; top-p and the seeded
    # rewind in the engine (or worker) process, where the model samples); main() logs what is off.
    seam.install_at_import(engine_process=__name__ == "__mp_main__")
    quiet_uniprocess_warnings()

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
    keyring = load_keyring(args)  # 3. API keys by name: a malformed keys file stops here, before the engine loads
    # 4. Which of vLLM's internals this server may replace on this vLLM (server/seam.py): one line per patch
    # that is off. Without our app, keys would not be checked: never serve then.
    seam.report(logger)
    if keyring is not None and not seam.on("app"):
        sys.exit(f"error: API keys need this server's app, which cannot be added to vLLM {seam.current().version} "
                 f"({seam.current().decision('app').why}); not serving without them.")
    if args.model == str(DEFAULT_MODEL_DIR):
        try:
            prepare(DEFAULT_MODEL_DIR)  # 5. the bundled model, prepared once and verified (streaming_tutorial/model.py)
        except ModelPreparationError as error:
            sys.exit(f"error: {error}")
    # 6. SIGTERM or Ctrl-C while starting stops every process at once (server/startup_signals.py); once the
    # server serves, vLLM's graceful shutdown takes over. (Until here no child process exists.)
    adopt_orphans()
    guard = StartupGuard()
    guard.install()
    death = EngineDeathWatch()
    # 7. Through the seam, each where vLLM calls it: our routes and middlewares on vLLM's app (server/app.py;
    # vLLM's serve path builds its app with the module-level `build_app`, which now points at `create_app`);
    # the start-up guard again just before the engine starts (vLLM's run_server replaces the SIGTERM handler);
    # an engine death in the exit code (server/shutdown.py), or a new engine in its place with
    # --restart-engine (server/engine_restart.py), worded for a student (server/restart_hooks.py).
    seam.install_in_api_server(death, guard)
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
