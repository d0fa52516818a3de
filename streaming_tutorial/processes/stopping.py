"""The one way this project stops processes: SIGTERM, a grace period, then SIGKILL.

- `stop_processes()` stops a list of processes; `stop_process_group()` applies it to a process group: a server
  started in its own session by `LocalServer` (processes/local_server.py), by a notebook (`stop_with_kernel`,
  whose watchdog is `python -m streaming_tutorial.processes.stopping`) or by a test.
- The server uses it too, for what is left below it when it stops (server/shutdown.py).
"""

from __future__ import annotations

import os
import sys
import time

import psutil


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


if __name__ == "__main__":  # python -m streaming_tutorial.processes.stopping OWNER_PID PGID: the watchdog
    stop_group_with(int(sys.argv[1]), int(sys.argv[2]))
