"""Engine death heals itself (issue 19): a new engine inside the same server, so a workshop carries on.

vLLM 0.32 stops the whole API server when its EngineCore process dies (killed, out of memory, a crash): its
watchdog calls `terminate_if_errored`, uvicorn exits, every student's client gets "Connection error", and the
page goes dead. With restarts on (`--restart-engine`; the default with API keys or a non-loopback `--host`),
this module intercepts that call instead and, inside the same server process:

1. marks the app "restarting": `RestartMiddleware` answers requests with 503, Retry-After and a message a
   student understands, /health says "restarting" (server/app.py), the page shows it;
2. stops what is left of the dead engine (vLLM's own shutdown, then any of its processes still below us);
3. starts a new engine from the same arguments (in a thread: vLLM's engine start blocks for as long as the model
   loads, and the server must keep answering meanwhile), re-runs vLLM's `init_app_state` on it, and re-applies
   what this project wraps around the engine client (request_checks.py: the output-token cap; admission.py:
   the token counting);
4. marks the app "healthy" again. The socket, the keys, the limits and the page never went away.

Streams in flight when the engine dies end with an error event that says so and `[DONE]` (vLLM's stream
generators send the error; `friendly_error` words it). A crash loop stops: a death more than `MAX_RESTARTS`
times within `RESTART_WINDOW_S` stops the server as vLLM would, and `main()` exits non-zero.
Without restarts, the message is reworded the same way and everything else is vLLM's behaviour.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import signal
import threading
import time
from collections import deque

from streaming_tutorial.server.admission import watch_engine
from streaming_tutorial.server.keys import keys_file_arg
from streaming_tutorial.server.request_checks import cap_default_output_tokens, env_int
from streaming_tutorial.server.security import api_keys, is_loopback
from streaming_tutorial.server.shutdown import stop_leftover_processes

logger = logging.getLogger("vllm.streaming_tutorial.server.engine_restart")  # under "vllm": vLLM's log format

# A crash loop (a model that cannot load, memory that is not there) must not restart forever: more deaths
# than this within the window stop the server, as vLLM does on the first.
MAX_RESTARTS = 3
MAX_RESTARTS_ENV = "TUTORIAL_MAX_ENGINE_RESTARTS"
RESTART_WINDOW_S = 300.0
# What students are told to wait before one restart has been timed (then: the last restart's time). Measured on
# the 2-core laptop, bundled model, from the kill to the first request served: 15 s (warm compile cache), 13 s
# with --enforce-eager.
FIRST_ESTIMATE_S = 20
STOPPING = ("The server's engine stopped, and the server is shutting down; ask whoever runs it to start it again "
            "(the cause is in its terminal).")


def add_restart_args(parser) -> None:
    parser.add_argument(
        "--restart-engine", action=argparse.BooleanOptionalAction, default=None,
        help="When the engine process dies, start a new one inside this server (same address, keys, limits "
             "and page); meanwhile requests get 503 with Retry-After and /health says \"restarting\". Stops "
             f"after {MAX_RESTARTS} restarts within {RESTART_WINDOW_S / 60:.0f} minutes (environment: "
             f"{MAX_RESTARTS_ENV}). Default: on with API keys (--api-key, --api-keys-file) or a --host other than "
             "loopback (a workshop), else off (the server exits, as plain vLLM does).")


def restart_wanted(args) -> bool:
    from streaming_tutorial.server import seam

    if not seam.on("engine-restart"):  # not verified on this vLLM: start-up said so, in one line
        return False
    if getattr(args, "restart_engine", None) is not None:
        return args.restart_engine
    shared = not (getattr(args, "uds", None) or is_loopback(args.host))
    return bool(api_keys(args) or keys_file_arg(args)) or shared


def describe_death(engine) -> str:
    """'EngineCore (pid 123) was killed by SIGKILL ...', from the engine manager's processes, where known."""
    manager = getattr(getattr(getattr(engine, "engine_core", None), "resources", None), "engine_manager", None)
    parts = []
    for proc in getattr(manager, "processes", []):
        code = proc.exitcode
        if code is not None and code < 0:
            how = f"was killed by {signal.Signals(-code).name}"
            if -code == signal.SIGKILL:
                how += " (out of memory, or `kill -9`)"
        else:
            how = f"exited with code {code}"
        parts.append(f"{proc.name} (pid {proc.pid}) {how}")
    return "; ".join(parts) or "the engine stopped answering"


async def in_thread(function, *args):
    """`function(*args)` in a daemon thread of its own. Not the loop's default executor: a server stopped
    (Ctrl-C) while a new engine loads must not wait for it at exit; main() stops its processes."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def settle(outcome, value) -> None:
        if not done.done():
            outcome(value)

    def hand_over(outcome, value) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: the server stopped meanwhile
            loop.call_soon_threadsafe(settle, outcome, value)

    def run() -> None:
        try:
            hand_over(done.set_result, function(*args))
        except BaseException as error:  # handed to the awaiting task
            hand_over(done.set_exception, error)

    threading.Thread(target=run, name="engine-restart", daemon=True).start()
    return await done


def start_engine(args):
    """A new engine client from the server's arguments, as vLLM's `build_async_engine_client` makes one.

    Not that context manager itself: it builds the engine synchronously (minutes on a cold cache) on the event
    loop, which must keep answering 503s meanwhile. Run this in a thread; AsyncLLM then starts its background
    tasks lazily, on the server's loop (`adopt_engine`)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    from streaming_tutorial.server.seam import cli_args

    propagate_flash_late_interaction = cli_args("propagate_flash_late_interaction")  # moved in vLLM 0.34
    engine_args = AsyncEngineArgs.from_cli_args(args)
    propagate_flash_late_interaction(args, engine_args)
    usage = UsageContext.OPENAI_API_SERVER
    return AsyncLLM.from_vllm_config(
        vllm_config=engine_args.create_engine_config(usage_context=usage), usage_context=usage,
        enable_log_requests=engine_args.enable_log_requests,
        aggregate_engine_logging=engine_args.aggregate_engine_logging,
        disable_log_stats=engine_args.disable_log_stats)


async def adopt_engine(app, engine, args) -> None:
    """Put a new engine client where the first one was: vLLM's app state, then what this project adds."""
    from vllm.entrypoints.launchers.api_server import entry

    await engine.reset_mm_cache()  # as vLLM's builder does
    engine._run_output_handler()  # what AsyncLLM does when built on the loop: an idle engine's death shows too
    cap_default_output_tokens(engine.model_config, app.state.tutorial_limits.max_output_tokens)
    app.state.sampling_defaults = engine.model_config.get_diff_sampling_param()  # as create_app reads it
    await entry.init_app_state(engine, app.state, args, await engine.get_supported_tasks())
    watch_engine(app)


class EngineRestart:
    """The restart state of one app: "healthy", "restarting", or "stopped" (gave up: the server stops)."""

    def __init__(self, app, args, enabled: bool) -> None:
        self.app, self.args, self.enabled = app, args, enabled
        self.max_restarts = env_int(MAX_RESTARTS_ENV, MAX_RESTARTS)
        self.status = "healthy"
        self.deaths: deque[float] = deque()
        self.began: float | None = None  # when the current restart began
        self.outages: list[float] = []  # seconds from each death noticed to serving again
        self.first = None  # the engine vLLM's launcher started and holds on to (see `stand_in`)
        self.current = None  # the engine this started last, while it serves (vLLM's lifespan ends by dropping
        # app.state, so SIGINT's shutdown, which comes later, finds it here)
        self.task: asyncio.Task | None = None

    # ---- what students are told ----

    def estimate(self) -> float:
        return self.outages[-1] if self.outages else FIRST_ESTIMATE_S

    def retry_after(self) -> int:
        elapsed = time.monotonic() - self.began if self.began is not None else 0.0
        return max(1, math.ceil(self.estimate() - elapsed)) if elapsed < self.estimate() else 5

    def message(self) -> str:
        if self.status != "restarting" and (not self.enabled or self.status == "stopped" or self.too_many(extra=1)):
            return STOPPING
        return (f"The server's engine stopped and is restarting; try again in about {self.retry_after()} s "
                f"(the server's /health says \"healthy\" again when it is back).")

    def health(self) -> dict:
        return {"enabled": self.enabled, "restarts": len(self.outages), "max_restarts": self.max_restarts,
                "window_s": RESTART_WINDOW_S,
                "last_outage_s": round(self.outages[-1], 1) if self.outages else None}

    # ---- noticing a death ----

    def engine(self):
        return getattr(getattr(self.app, "state", None), "engine_client", None)

    def engine_dead(self) -> bool:
        engine = self.engine()
        return engine is not None and engine.errored and not engine.is_running  # vLLM's own test

    def too_many(self, extra: int = 0) -> bool:
        while self.deaths and time.monotonic() - self.deaths[0] > RESTART_WINDOW_S:
            self.deaths.popleft()
        return len(self.deaths) + extra > self.max_restarts

    def notice(self) -> bool:
        """Begin a restart if the engine has died. False when the server must stop instead (restarts off,
        or a crash loop); True when it is serving or restarting."""
        if not self.enabled or self.status == "stopped":
            return False
        if self.status == "restarting" or not self.engine_dead():
            return True
        self.deaths.append(time.monotonic())
        dead = self.engine()
        if self.too_many():
            return self.give_up(f"the engine process died {len(self.deaths)} times within "
                                f"{RESTART_WINDOW_S / 60:.0f} minutes ({describe_death(dead)})")
        logger.error("The engine process died: %s. Restarting it inside this server (restart %d of at most %d "
                     "within %.0f minutes); until it is back, requests get 503 and /health says \"restarting\".",
                     describe_death(dead), len(self.deaths), self.max_restarts, RESTART_WINDOW_S / 60)
        self.status, self.began = "restarting", time.monotonic()
        self.task = asyncio.get_running_loop().create_task(self.restart())
        return True

    def unavailable(self) -> bool:
        """Whether requests must wait for a new engine: it is starting, or the engine has just died (its output
        handler may still be ending the streams in flight; the restart begins right after)."""
        if not self.notice():
            return False
        engine = self.engine()
        return self.status == "restarting" or (engine is not None and engine.errored)

    def give_up(self, why: str) -> bool:
        self.status = "stopped"
        logger.error("Not restarting the engine again: %s. Stopping the server.", why)
        return False

    # ---- restarting ----

    async def restart(self) -> None:
        while True:
            await in_thread(self.retire, self.engine())
            engine = None
            try:
                engine = await in_thread(start_engine, self.args)
                await adopt_engine(self.app, engine, self.args)
                self.current = engine
                break
            except Exception as error:
                logger.exception("Starting a new engine failed")
                if engine is not None:
                    engine.shutdown()
                self.deaths.append(time.monotonic())
                if self.too_many():
                    self.give_up(f"a new engine failed to start ({type(error).__name__}: {error})")
                    return self.stop_server()
        self.outages.append(time.monotonic() - self.began)
        self.status, self.began = "healthy", None
        logger.warning("The engine is back after %.1f s; serving again on the same address, with the same keys "
                       "and limits (restarts so far: %d).", self.outages[-1], len(self.outages))

    def retire(self, dead) -> None:
        """Stop what is left of a dead engine: vLLM's shutdown of its client, then any of its processes still
        running below this server (a worker orphaned by its EngineCore comes to us: shutdown.adopt_orphans)."""
        from vllm import envs

        if self.first is None:
            self.first = dead
            stand_in(dead, self)
        else:
            self.current = None
            dead.shutdown()
        if leftovers := stop_leftover_processes(prefix=f"{envs.VLLM_PROCESS_NAME_PREFIX}::"):
            logger.info("Stopped the dead engine's leftover process(es): %s", leftovers)

    def stop_server(self) -> None:
        """Stop the server as vLLM does on an engine death (and EngineDeathWatch notes it for main's exit code)."""
        from vllm.entrypoints.launchers import launcher

        server = getattr(self.app.state, "server", None)
        if server is not None:
            launcher.terminate_if_errored(server, self.engine())


def stand_in(first, restart: EngineRestart) -> None:
    """vLLM's launcher keeps the first engine client it started: on SIGINT/SIGTERM it calls its `shutdown`, and
    its stats task its `do_log_stats`. Once that engine is dead, both go to the current engine too."""
    shutdown_first = first.shutdown
    shutdown_first()

    def shutdown(timeout: float | None = None) -> None:
        if (engine := restart.current) is not None:
            engine.shutdown(timeout=timeout)

    async def do_log_stats() -> None:
        if (engine := restart.current) is not None:
            await engine.do_log_stats()

    first.shutdown, first.do_log_stats = shutdown, do_log_stats
