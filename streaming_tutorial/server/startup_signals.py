"""Stopping the server while it starts: SIGTERM or SIGINT (Ctrl-C) at any point of start-up ends every process of
the server within seconds (issue 19). Once the server is up, vLLM's own shutdown takes over.

What vLLM 0.32 does instead, and why it fails:

- The EngineCore process, while it is being built (loading the model, compiling it, which takes minutes on an
  empty compile cache), only *records* a SIGTERM or SIGINT and keeps building: its handler
  (`run_engine_core` in vllm/v1/engine/core.py) sets `shutdown_requested`, acted on once construction has ended.
- The API server process waits for the engine synchronously (zmq polls in `wait_for_engine_startup`, inside
  the first step of the asyncio task), so no event-loop signal handler can run. vLLM's `run_server` answers
  SIGTERM by raising KeyboardInterrupt from a plain handler, wherever the main thread is; there, that is inside
  `with zmq_socket_ctx(...)` (vllm/utils/network_utils.py), which catches KeyboardInterrupt and only logs it at
  debug level. Start-up goes on and the server serves as if no signal had come. SIGINT reaches asyncio's
  `Runner`, which only cancels the main task: delivered at its next `await`, once the engine is ready.

So `StartupGuard` installs a plain handler for both signals in `main()`, before vLLM's, and installs it again
just before the engine is created (vLLM's `run_server` replaces the SIGTERM handler first thing). It stops every
process below the server (`shutdown.stop_leftover_processes`: SIGTERM, a short grace, then SIGKILL, since an
engine under construction ignores SIGTERM) and ends the server with the signal's own exit status. uvicorn's
loop handlers replace it once the server starts serving (`vllm.entrypoints.launchers.launcher.serve_http`);
from then on a signal stops the server gracefully, as vLLM does.
"""

from __future__ import annotations

import os
import signal
import sys

from streaming_tutorial.server.shutdown import stop_leftover_processes

# An engine under construction ignores SIGTERM (see above): do not wait long before SIGKILL.
STOP_GRACE_S = 2.0
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StartupGuard:
    """The start-up handler of SIGTERM and SIGINT: stop every child process, then exit with that signal."""

    def __init__(self, grace: float = STOP_GRACE_S) -> None:
        self.grace = grace

    def install(self) -> None:
        for signum in SIGNALS:
            signal.signal(signum, self.handle)

    def handle(self, signum: int, frame) -> None:
        """Runs in the main thread between two Python instructions, wherever start-up is. It never returns:
        raising there (as vLLM does) can be caught or left waiting, and start-up would go on."""
        for signum_ in SIGNALS:  # a second Ctrl-C while we stop the children must not interrupt us
            signal.signal(signum_, signal.SIG_IGN)
        say(f"Received {signal.Signals(signum).name} while starting: stopping the server and its processes.")
        try:
            if stopped := stop_leftover_processes(self.grace):
                say(f"Stopped: {', '.join(stopped)}")
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)  # the exit status a shell expects of a stopped program (143, 130)
            os._exit(128 + signum)  # in case the signal is blocked

    def wrap_once(self, module, name: str) -> None:
        """Install this guard again when `module.name` is first called (just before the engine is created)."""
        original = getattr(module, name)

        def guarded(*args, **kwargs):
            setattr(module, name, original)  # once: a later call (an engine built again) must not take over
            self.install()
            return original(*args, **kwargs)

        setattr(module, name, guarded)


def say(line: str) -> None:
    """Write a line to stderr without the logging module, whose lock the interrupted code may hold."""
    try:
        os.write(2, f"(APIServer pid={os.getpid()}) {line}\n".encode())
    except OSError:
        pass
