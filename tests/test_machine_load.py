"""client/machine_load.py: the CPU that other programs used during a measurement (no server needed)."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil

from streaming_tutorial.client.machine_load import OtherLoad

BUSY_LOOP = "import time\nend = time.monotonic() + 1.5\nwhile time.monotonic() < end: pass"


def test_a_busy_process_counts_as_other_load_unless_it_is_named_as_our_own():
    hog = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
    try:
        proc = psutil.Process(hog.pid)
        with OtherLoad(lambda: [psutil.Process()]) as unnamed, OtherLoad(lambda: [psutil.Process(), proc]) as named:
            os.waitid(os.P_PID, hog.pid, os.WEXITED | os.WNOWAIT)  # ended, not reaped: its CPU times stay readable
            hog_seconds = sum(proc.cpu_times()[:2])
    finally:
        hog.kill()
        hog.wait()
    assert hog_seconds > 0.3, f"the busy loop got only {hog_seconds:.2f} s of CPU"
    # Whatever else ran meanwhile counts in both; the hog's seconds only in the one that does not name it.
    assert abs((unnamed.other_seconds - named.other_seconds) - hog_seconds) < 0.1
    assert 0 <= named.share < unnamed.share <= 1
