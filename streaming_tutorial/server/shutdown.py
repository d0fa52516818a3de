"""What `streaming_server.py` adds around vLLM 0.32's launcher so that stopping the server stops everything.

- `adopt_orphans()`: makes the API server a Linux "child subreaper". When vLLM's EngineCore process dies
  abruptly (killed, crashed), its worker process is orphaned; vLLM's worker notices through a pipe but, on a
  busy machine, took 30-60 s to exit. As a subreaper the API server inherits such orphans, so:
- `stop_leftover_processes()` (called when the server stops) ends every process still below it. After the
  server process exits, nothing of its tree survives.
- `EngineDeathWatch`: records whether the server stopped because the engine died (vLLM's
  `terminate_if_errored`, which its watchdog and its EngineDeadError handler call), so `main()` can exit
  with a non-zero code and a last log line that says so; vLLM 0.32 exits 0 in that case.
"""

from __future__ import annotations

import ctypes
import sys

import psutil

from streaming_tutorial.processes.stopping import stop_processes

PR_SET_CHILD_SUBREAPER = 36


def adopt_orphans() -> bool:
    """Become the reaper of orphaned descendants (Linux only; a no-op elsewhere). Returns whether it worked."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def stop_leftover_processes(grace: float = 2.0, prefix: str = "") -> list[str]:
    """Stop every descendant of this process (only those whose name starts with `prefix`, if given); returns
    the names and pids of those that were still running (zombies, already dead, are only reaped)."""
    children = [child for child in psutil.Process().children(recursive=True) if named(child, prefix)]
    running = []
    for child in children:
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                running.append(f"{child.name()} (pid {child.pid})")
        except psutil.NoSuchProcess:
            pass
    stop_processes(children, grace)
    return running


def named(proc: psutil.Process, prefix: str) -> bool:
    try:
        return proc.name().startswith(prefix)
    except psutil.NoSuchProcess:
        return False


class EngineDeathWatch:
    """Wraps vLLM's `terminate_if_errored(server, engine)` wherever vLLM looks it up, to note engine death."""

    def __init__(self) -> None:
        self.engine_died = False

    def install(self, *modules) -> None:
        for module in modules:
            original = module.terminate_if_errored

            def watched(server, engine, _original=original):
                was_exiting = server.should_exit
                _original(server, engine)
                if server.should_exit and not was_exiting:  # this call stopped the server: the engine died
                    self.engine_died = True

            module.terminate_if_errored = watched
