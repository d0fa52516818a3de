"""What `streaming_server.py` adds around vLLM 0.32's launcher so that stopping the server stops everything.

- `adopt_orphans()`: makes the API server a Linux "child subreaper". When vLLM's EngineCore process dies
  abruptly (killed, crashed), its worker process is orphaned; vLLM's worker notices through a pipe but, on a
  busy machine, took 30-60 s to exit. As a subreaper the API server inherits such orphans, so:
- `stop_leftover_processes()` (called when the server stops) ends every process still below it. After the
  server process exits, nothing of its tree survives.
- `stop_processes()`: the one way this project stops processes: SIGTERM, a grace period, then SIGKILL.
  `stop_process_group()` applies it to a process group: a server started in its own session by `LocalServer`,
  by a notebook (`stop_with_kernel`, whose watchdog is `python -m streaming_tutorial.lifecycle`) or by a test.
- `EngineDeathWatch`: records whether the server stopped because the engine died (vLLM's
  `terminate_if_errored`, which its watchdog and its EngineDeadError handler call), so `main()` can exit
  with a non-zero code and a last log line that says so; vLLM 0.32 exits 0 in that case.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time

import psutil

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


def stop_processes(processes: list[psutil.Process], grace: float) -> dict[int, int | None]:
    """SIGTERM each process, wait up to `grace` seconds for all of them to exit, then SIGKILL the rest.
    Returns {pid: exit code} (None where the process was not our child), e.g. -9 for one that was killed."""
    for proc in processes:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    gone, alive = psutil.wait_procs(processes, timeout=grace)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    killed, _ = psutil.wait_procs(alive, timeout=10)
    return {proc.pid: getattr(proc, "returncode", None) for proc in [*gone, *killed]}


def group_members(pgid: int) -> list[psutil.Process]:
    """The processes of process group `pgid` (a server started with `start_new_session=True` leads one)."""
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid:
                members.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return members


def stop_process_group(pgid: int, grace: float = 30.0) -> dict[int, int | None]:
    """`stop_processes` on every process of group `pgid`: the server and its engine and worker processes."""
    return stop_processes(group_members(pgid), grace)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def stop_group_with(owner_pid: int, pgid: int, poll: float = 1.0) -> None:
    """Wait while process `owner_pid` lives; if it dies first, stop group `pgid`. Returns once the group is
    gone. The watchdog that `notebook.stop_with_kernel` starts runs this in a process of its own."""
    while group_alive(pgid):
        if not psutil.pid_exists(owner_pid):
            stop_process_group(pgid)
            return
        time.sleep(poll)


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


if __name__ == "__main__":  # python -m streaming_tutorial.lifecycle OWNER_PID PGID: the watchdog
    stop_group_with(int(sys.argv[1]), int(sys.argv[2]))
