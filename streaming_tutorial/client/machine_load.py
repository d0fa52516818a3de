"""How much CPU other programs used while we measured: the noise that a shared machine adds to a benchmark.

A throughput measured while something else ran is not a property of the server. On a 2-core laptop a browser tab,
an indexer or a second notebook is enough to turn a scaling table into nonsense. `OtherLoad` measures, for the
duration of a `with` block, the share of all cores that was busy with processes *other* than the ones named
(the servers under test and this Python process), a virtual machine's steal time included:

    with OtherLoad(lambda: [*cluster.processes(), psutil.Process()]) as load:
        ...                                 # the measurement
    load.share                              # 0.0: the machine was ours; 0.5: half of it was busy elsewhere
"""

from __future__ import annotations

import time
from collections.abc import Callable

import psutil


def busy_cpu_seconds() -> float:
    """CPU seconds spent on anything but idling since boot, all cores together (steal time counts as busy)."""
    t = psutil.cpu_times()
    # Linux counts guest time in user time already; idle and iowait are the CPU doing nothing.
    return sum(t) - t.idle - sum(getattr(t, name, 0.0) for name in ("iowait", "guest", "guest_nice"))


def cpu_seconds(processes: list[psutil.Process]) -> dict[int, float]:
    seconds = {}
    for proc in processes:
        try:
            times = proc.cpu_times()
            seconds[proc.pid] = times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return seconds


class OtherLoad:
    """`share`: the fraction of all cores used by processes outside `own()` during the `with` block;
    `other_seconds`: the CPU seconds they used."""

    def __init__(self, own: Callable[[], list[psutil.Process]]):
        self.own = own
        self.share: float | None = None

    def __enter__(self) -> OtherLoad:
        self.processes = self.own()
        self.started, self.busy, self.mine = time.monotonic(), busy_cpu_seconds(), cpu_seconds(self.processes)
        return self

    def __exit__(self, *exc_info) -> None:
        wall = time.monotonic() - self.started
        mine = cpu_seconds(self.processes)
        used_by_us = sum(mine[pid] - self.mine[pid] for pid in mine if pid in self.mine)
        self.other_seconds = max(0.0, busy_cpu_seconds() - self.busy - used_by_us)
        self.share = min(1.0, self.other_seconds / max(wall * (psutil.cpu_count() or 1), 1e-9))  # ticks round
