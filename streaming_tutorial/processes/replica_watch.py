"""A `LocalCluster` that notices: a dead replica is reported at once, what it left behind is stopped, and it is
started again on its port.

Why: a replica's API server that dies abruptly (SIGKILL, the OOM killer, a crash) leaves its EngineCore process
running, orphaned to PID 1 and using CPU, and the cluster serves with one replica fewer until someone notices.

`ReplicaWatch(cluster)` is a thread that checks every replica's server process (our child, so `poll()` sees its
exit at once) every `POLL_S`. When one has exited, it:

1. reports it (`cluster.report`: printed by `make cluster`, kept in `cluster.events`);
2. stops every process still in the replica's process group: its EngineCore and worker keep the group they were
   started in when their parent dies, so the group finds them wherever they were reparented;
3. starts the replica again on the same port, so the router's worker URL stays valid, and waits until it is
   healthy; the router's health check then puts it back in the rotation. Meanwhile the router stops sending it
   requests by itself (health checks, circuit breaker) and retries the ones that failed to connect.

Replicas restart one at a time (two vLLM starts at once on a small CPU starve each other). A replica that fails to
start `MAX_ATTEMPTS` times in a row stays down, with a message that says where its log is.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import TYPE_CHECKING

import psutil

from streaming_tutorial.processes.local_server import ServerStartError
from streaming_tutorial.processes.stopping import group_members

if TYPE_CHECKING:
    from streaming_tutorial.processes.cluster import LocalCluster, Replica

POLL_S = 0.5
REAP_GRACE_S = 3.0  # SIGTERM, then SIGKILL: an orphaned EngineCore has nothing left to finish
MAX_ATTEMPTS = 3
RETRY_PAUSE_S = 5.0


class ClusterStopping(RuntimeError):
    """Raised in a replica that was being (re)started when the cluster was told to stop."""


def describe_exit(code: int | None) -> str:
    if code is None:
        return "is gone"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def leftovers(pgid: int) -> list[str]:
    """The processes of group `pgid` still running (zombies excluded), as "name (pid N, parent P)": a parent 1
    is an orphan, adopted by init."""
    names = []
    for proc in group_members(pgid):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                names.append(f"{proc.name()} (pid {proc.pid}, parent {proc.ppid()})")
        except psutil.NoSuchProcess:
            pass
    return names


class ReplicaWatch(threading.Thread):
    """Watches `cluster`'s replicas until `stop()`; see the module's docstring."""

    def __init__(self, cluster: LocalCluster, poll: float = POLL_S):
        super().__init__(name=f"{cluster.name}-replica-watch", daemon=True)
        self.cluster = cluster
        self.poll = poll
        self.stopping = threading.Event()
        self.given_up: set[int] = set()

    def stop(self, timeout: float = 60.0) -> None:
        self.stopping.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)

    def run(self) -> None:
        while not self.stopping.wait(self.poll):
            for index, replica in enumerate(list(self.cluster.replicas)):
                if self.stopping.is_set():
                    return
                if index not in self.given_up and replica.process is not None and replica.process.poll() is not None:
                    self.recover(index, replica)

    def recover(self, index: int, dead: Replica) -> None:
        """Report replica `index`'s death, stop what it left behind, start it again (unless someone else did)."""
        cluster = self.cluster
        with cluster.restart_lock:
            if cluster.replicas[index] is not dead or self.stopping.is_set():  # restarted or stopped on purpose
                return
            pid = dead.process.pid
            cluster.report(f"replica {index} ({dead.url}, pid {pid}) {describe_exit(dead.process.returncode)}; "
                           f"the router stops sending it requests after its health checks fail")
            left = leftovers(pid)
            dead.stop(REAP_GRACE_S)
            cluster.report(f"replica {index}: stopped what it left behind: {', '.join(left)}" if left else
                           f"replica {index}: nothing of it was left running")
            self.restart(index, dead)

    def restart(self, index: int, dead: Replica) -> None:
        cluster = self.cluster
        for attempt in range(1, MAX_ATTEMPTS + 1):
            cluster.report(f"replica {index}: starting it again on port {dead.port} (about 30 s on a 2-core CPU); "
                           f"its last log: {dead.log_path}")
            started = time.monotonic()
            try:
                replica = cluster.restart_replica(index)
            except ClusterStopping:
                return
            except ServerStartError as error:
                if self.stopping.is_set():
                    return
                cluster.report(f"replica {index} did not start (attempt {attempt} of {MAX_ATTEMPTS}): "
                               f"{str(error).splitlines()[0]}")
                if self.stopping.wait(RETRY_PAUSE_S):
                    return
                continue
            cluster.report(f"replica {index} is back after {time.monotonic() - started:.0f} s ({replica.url}, "
                           f"pid {replica.process.pid}); the router's health check returns it to the rotation")
            return
        self.given_up.add(index)
        cluster.report(f"replica {index} stays down after {MAX_ATTEMPTS} failed starts; the other replicas keep "
                       f"serving. Read {cluster.replicas[index].log_path}, fix the cause, and start the cluster "
                       f"again")
