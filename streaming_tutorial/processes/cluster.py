"""Several `streaming_server.py` replicas behind vLLM's router (`vllm-router`), started and stopped as one unit.

    with LocalCluster(replicas=2) as cluster:
        client = openai.OpenAI(base_url=cluster.url_for("v1"), api_key=cluster.api_key or "unused")
        ...                                   # the client only sees another base URL

Each replica is a `LocalServer` (its own process group and log file) on a free loopback port, started one after
another: two vLLM starts at once on a small CPU slow each other badly. Every replica gets an explicit, small KV
cache (`--kv-cache-memory-bytes`), and any vLLM flag in `args` passes through to all of them. The router is
`python -m vllm_router.launch_router` from this Python environment, bound to 127.0.0.1 on a free port, in a
process group of its own, logging to `LOG_DIR/<name>-router.log`. `stop()` stops the router, then every replica
(`stopping.stop_process_group`), so nothing of the cluster outlives the `with` block.

A cluster notices (`supervise=True`, the default): a `ReplicaWatch` thread (replica_watch.py) sees a replica's server
process exit within half a second, reports it (`report`: printed, and kept in `events`), stops what it left behind
(its EngineCore, orphaned) and starts it again on the same port, one replica at a time.

The router's defaults suit a data centre; the ones changed here, and why (`python -m vllm_router.launch_router
--help` lists them all):

- `--health-check-interval-secs 2` (default 60) and `--health-failure-threshold 2` (default 3): a dead replica
  leaves the rotation within a few seconds instead of minutes, so the failure lesson can be watched live.
  The router also retries a request whose replica refuses the connection (`--retry-max-retries`, default 5),
  so new requests succeed on the survivor even before the health check notices.
- `--cb-failure-threshold 5` (default 10) and `--cb-timeout-duration-secs 10` (default 60): the circuit breaker
  takes a replica whose requests fail out of the rotation after 5 failures, and tries it again after 10 s instead of
  a minute, so a restarted replica gets its share of a class's requests back soon after it is healthy.
- `--worker-startup-check-interval 1` (default 30): our replicas are already healthy when the router starts.
- `--prometheus-port`: a free port (the launcher's default is the fixed port 29000, so two clusters would collide).

Keys: the router does not check clients' keys and, in this (regular) mode, forwards each client's
`Authorization` header to the replica unchanged; its own `--api-key` is what it sends in data-parallel and
prefill/decode modes, not here. So a keyed cluster is replicas with `--api-key` (`api_key=` below) and clients
that send that key to the router; a client without it gets the replica's 401, passed back by the router.

`make cluster` (scripts/cluster.py) starts one from the command line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx
import psutil

from streaming_tutorial.processes.local_server import (
    DEFAULT_STARTUP_TIMEOUT,
    LOG_DIR,
    PROJECT_ROOT,
    TEST_KV_CACHE_BYTES,
    Endpoint,
    LocalServer,
    free_port,
    poll_until_ok,
)
from streaming_tutorial.processes.replica_watch import ClusterStopping, ReplicaWatch
from streaming_tutorial.processes.stopping import group_alive, group_members, stop_process_group

ROUTER_MODULE = "vllm_router.launch_router"
ROUTER_STARTUP_TIMEOUT = 60.0  # the router itself is up in about a second
HEALTH_CHECK_INTERVAL_S = 2
HEALTH_FAILURE_THRESHOLD = 2
CB_FAILURE_THRESHOLD = 5
# The flags LocalCluster gives the router; `router_args` may override any of them (argparse: the last one wins).
ROUTER_DEFAULT_ARGS = ["--health-check-interval-secs", str(HEALTH_CHECK_INTERVAL_S),
                       "--health-failure-threshold", str(HEALTH_FAILURE_THRESHOLD),
                       "--health-check-timeout-secs", "2",
                       "--cb-failure-threshold", str(CB_FAILURE_THRESHOLD),
                       "--cb-timeout-duration-secs", "10",
                       "--worker-startup-check-interval", "1"]


def print_event(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


class Replica(LocalServer):
    """A `LocalServer` that can be given its port (a replica restarted where the router expects it) and that
    reports its process group as soon as it is launched (`on_launch`, e.g. `notebook.stop_with_kernel`)."""

    def __init__(self, args: Sequence[str] = (), *, port: int | None = None,
                 on_launch: Callable[[int], object] | None = None, **kwargs):
        super().__init__(args, **kwargs)
        if port is not None:
            self.port = port
            self.argv[self.argv.index("--port") + 1] = str(port)
        self.on_launch = on_launch
        self._reported = False

    def wait_until_healthy(self) -> dict | None:
        if self.on_launch is not None and not self._reported:
            self.on_launch(self.process.pid)
            self._reported = True
        return super().wait_until_healthy()


class LocalCluster(Endpoint):
    """`replicas` copies of `streaming_server.py` (flags `args`) behind one `vllm-router` (policy `policy`).
    `url` is the router's address: the only one clients need."""

    def __init__(self, replicas: int = 2, args: Sequence[str] = (), *, policy: str = "round_robin",
                 api_key: str | None = None, router_args: Sequence[str] = (), name: str = "cluster",
                 log_dir: Path = LOG_DIR, env: dict[str, str] | None = None,
                 startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
                 on_launch: Callable[[int], object] | None = None, supervise: bool = True,
                 on_event: Callable[[str], object] | None = print_event):
        if replicas < 1:
            raise ValueError("a cluster needs at least one replica")
        self.size = replicas
        self.args = ["--kv-cache-memory-bytes", TEST_KV_CACHE_BYTES, *args]  # a later flag in args wins
        self.policy = policy
        self.api_key = api_key
        self.router_args = list(router_args)
        self.name = name
        self.log_dir = Path(log_dir)
        self.env = {"VLLM_LOGGING_COLOR": "0", **(env or {})}
        self.startup_timeout = startup_timeout
        self.on_launch = on_launch
        self.host = "127.0.0.1"
        self.port = free_port()
        self.prometheus_port = free_port()
        self.replicas: list[Replica] = []
        self.router: subprocess.Popen | None = None
        self.router_log = self.log_dir / f"{name}-router.log"
        self.on_event = on_event
        self.events: list[tuple[float, str]] = []  # (time.monotonic(), text) of everything `report` said
        self.restarts = [0] * replicas
        self.restart_lock = threading.RLock()  # one (re)start at a time, by the watch or by hand
        self.watch = ReplicaWatch(self) if supervise else None

    # --- addresses ---------------------------------------------------------------------------------------

    @property
    def replica_urls(self) -> list[str]:
        return [replica.url for replica in self.replicas]

    @property
    def metrics_url(self) -> str:
        """The router's own Prometheus metrics (requests, retries, worker health, circuit-breaker state)."""
        return f"http://{self.host}:{self.prometheus_port}/metrics"

    # --- starting ----------------------------------------------------------------------------------------

    def new_replica(self, index: int, port: int | None = None) -> Replica:
        restarts = self.restarts[index]  # a restarted replica logs to a new file: the old one says why it died
        log = f"{self.name}-replica-{index}" + (f"-restart-{restarts}" if restarts else "") + ".log"
        return Replica(self.args, port=port, api_key=self.api_key, env=self.env,
                       startup_timeout=self.startup_timeout, on_launch=self.launched, log_path=self.log_dir / log)

    def launched(self, pid: int) -> None:
        """Each replica's process group, as soon as it exists. A replica launched while the cluster stops is
        stopped at once (`Replica.start` stops it when this raises): nothing may start after `stop()`."""
        if self.watch is not None and self.watch.stopping.is_set():
            raise ClusterStopping(f"{self.name} is stopping")
        if self.on_launch is not None:
            self.on_launch(pid)

    def report(self, text: str) -> None:
        """An event of the cluster's life (a replica died, was restarted): kept in `events`, passed to `on_event`."""
        self.events.append((time.monotonic(), text))
        if self.on_event is not None:
            self.on_event(text)

    def start(self) -> LocalCluster:
        try:
            for index in range(self.size):  # one after another: two vLLM starts at once slow each other badly
                self.replicas.append(self.new_replica(index).start())
            self.start_router()
        except BaseException:
            self.stop()
            raise
        if self.watch is not None:
            self.watch.start()
        return self

    def router_argv(self) -> list[str]:
        return [sys.executable, "-m", ROUTER_MODULE, "--host", self.host, "--port", str(self.port),
                "--prometheus-host", self.host, "--prometheus-port", str(self.prometheus_port),
                "--policy", self.policy, *ROUTER_DEFAULT_ARGS, *self.router_args,
                "--worker-urls", *self.replica_urls]

    def start_router(self, policy: str | None = None, router_args: Sequence[str] | None = None) -> None:
        """(Re)start the router on the same address, e.g. with another policy; the replicas keep running."""
        self.stop_router()
        if policy is not None:
            self.policy = policy
        if router_args is not None:
            self.router_args = list(router_args)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with self.router_log.open("ab") as log:
            self.router = subprocess.Popen(self.router_argv(), cwd=PROJECT_ROOT,
                                           env={**os.environ, "NO_COLOR": "1", **self.env},
                                           stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           start_new_session=True)
        if self.on_launch is not None:
            self.on_launch(self.router.pid)
        self.wait_for_router()

    def wait_for_router(self, timeout: float = ROUTER_STARTUP_TIMEOUT) -> dict:
        """Poll the router's /readiness until it answers 200 (it does once its workers are healthy)."""
        return poll_until_ok(self.url_for("readiness"), timeout, what="the router", process=self.router,
                             log_path=self.router_log, interval=0.1).json()

    # --- what the router knows ---------------------------------------------------------------------------

    def worker_health(self) -> dict[str, bool]:
        """{replica URL: healthy?} as the router sees it now (its /workers)."""
        workers = httpx.get(self.url_for("workers"), timeout=5).json()["workers"]
        return {worker["url"]: worker["is_healthy"] for worker in workers}

    def wait_for_worker_health(self, index: int, healthy: bool, timeout: float = 60.0) -> float:
        """Poll until the router marks replica `index` healthy (or not); returns the seconds it took."""
        started = time.monotonic()
        url = self.replicas[index].url
        while self.worker_health().get(url) is not healthy:
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"the router did not mark {url} {'healthy' if healthy else 'unhealthy'} "
                                   f"within {timeout:.0f} s")
            time.sleep(0.05)
        return time.monotonic() - started

    def router_metrics(self) -> str:
        return httpx.get(self.metrics_url, timeout=5).text

    def replica_metrics(self) -> list[str]:
        """Each replica's /metrics text, in replica order (a dead replica gives "")."""
        texts = []
        for replica in self.replicas:
            try:
                texts.append(httpx.get(replica.url_for("metrics"), timeout=5).text)
            except httpx.HTTPError:
                texts.append("")
        return texts

    # --- failure and recovery ----------------------------------------------------------------------------

    def kill_replica(self, index: int, sig: int = signal.SIGKILL, timeout: float = 30.0, group: bool = True) -> None:
        """Send `sig` to replica `index`'s whole process group (API server, engine, worker): a machine lost,
        as far as the router can tell. Returns once the group is gone. `group=False` sends it to the API server
        process only and returns once that is gone: its engine is left behind, orphaned (the watch stops it)."""
        replica = self.replicas[index]
        try:
            (os.killpg if group else os.kill)(replica.process.pid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while group_alive(replica.process.pid) if group else replica.process.poll() is None:
            try:  # reap the group leader (our child), or the group stays alive as a zombie
                replica.process.wait(timeout=0.1)
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"replica {index} (group {replica.process.pid}) still runs after {timeout} s")

    def restart_replica(self, index: int) -> Replica:
        """Start replica `index` again on its old port, where the router still expects it; blocks until healthy.
        The router's health check then puts it back in the rotation."""
        with self.restart_lock:
            old = self.replicas[index]
            old.stop()  # whatever is left of it
            self.restarts[index] += 1
            # In the list before it launches, so that a `stop()` meanwhile finds it.
            new = self.replicas[index] = self.new_replica(index, port=old.port)
            return new.start()

    def wait_for_replacement(self, index: int, old: Replica, timeout: float = 120.0) -> Replica:
        """Wait until replica `index` is a new, healthy one (the watch restarted `old`); returns it."""
        deadline = time.monotonic() + timeout
        while (new := self.replicas[index]) is old or new.health is None:
            if time.monotonic() > deadline:
                recent = "\n".join(text for _, text in self.events[-5:])
                raise TimeoutError(f"replica {index} is not back after {timeout:.0f} s; the cluster said:\n{recent}")
            time.sleep(0.2)
        return new

    # --- stopping ----------------------------------------------------------------------------------------

    def process_groups(self) -> list[int]:
        groups = [self.router.pid] if self.router is not None else []
        return groups + [replica.process.pid for replica in self.replicas if replica.process is not None]

    def processes(self) -> list[psutil.Process]:
        """Every process of the cluster still running (router, replicas, their engines and workers)."""
        return [proc for group in self.process_groups() for proc in group_members(group)]

    def stop_router(self, timeout: float = 10.0) -> int | None:
        if self.router is None:
            return None
        codes = stop_process_group(self.router.pid, timeout)
        try:
            code = self.router.wait(timeout=10)
        except subprocess.TimeoutExpired:
            code = codes.get(self.router.pid)
        return code

    def stop(self, timeout: float = 30.0) -> dict[str, int | None]:
        """Stop the router, then every replica (each whole process group). Returns {part: exit code}."""
        if self.watch is not None:
            self.watch.stopping.set()  # restarts no more; a replica it is starting is stopped below or at launch
        codes = {"router": self.stop_router()}
        for index, replica in enumerate(self.replicas):
            codes[f"replica-{index}"] = replica.stop(timeout)
        if self.watch is not None:
            self.watch.stop()
        return codes

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
