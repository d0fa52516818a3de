"""Wait for something the server will do soon, with a deadline: poll, never sleep a guessed time.

    wait_until(lambda: running() == 0, timeout=30, what="the aborted request to leave the batch")

The notebooks and the tests (tests/server_checks.py) wait with this one function.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(check: Callable[[], T], timeout: float, interval: float = 0.05, what: str = "the condition",
               pause: Callable[[float], object] = time.sleep) -> T:
    """Call `check` every `interval` seconds until it returns something true, and return that. Raises
    TimeoutError naming `what` if `timeout` seconds pass first (`check` runs at least once). `pause` waits
    between checks (a browser test passes Playwright's, which handles the page's events meanwhile)."""
    started = time.monotonic()
    while True:
        if value := check():
            return value
        if time.monotonic() - started >= timeout:
            raise TimeoutError(f"waited {timeout:g} s for {what}")
        pause(interval)
