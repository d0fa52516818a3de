"""A Chromium for the page's tests: Playwright's own when installed, else the system's.

    python -m streaming_tutorial.processes.browser   # `make browser`: find one, or install one; print which

Playwright downloads its browsers from a CDN that some machines cannot reach; a system Chromium
(Debian's `chromium` package) drives just as well when given by path.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

from streaming_tutorial.processes.system_tool import apt_install, try_command

SYSTEM_BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
HOW_TO_GET_ONE = ("No Chromium found: run `.venv/bin/python -m playwright install chromium`, or install your "
                  "system's chromium package (e.g. `sudo apt-get install chromium`), then `make browser` again.")


def find_chromium(playwright) -> str | None:
    """Playwright's own Chromium if `playwright install chromium` has fetched it, else the first on PATH."""
    own = playwright.chromium.executable_path
    return own if Path(own).exists() else next(filter(None, map(shutil.which, SYSTEM_BROWSERS)), None)


def launch(playwright, **options):
    """Start headless Chromium (`playwright` is what `sync_playwright()` gives), as the tests do."""
    executable = find_chromium(playwright)
    if executable is None:
        raise RuntimeError(HOW_TO_GET_ONE)
    args = ["--no-sandbox"] if os.geteuid() == 0 else []  # Chromium's sandbox refuses to run as root
    return playwright.chromium.launch(executable_path=executable, args=args, **options)


def find() -> str | None:
    with sync_playwright() as playwright:
        return find_chromium(playwright)


def main() -> int:
    found = find()
    if not found and try_command("Chromium", sys.executable, "-m", "playwright", "install", "chromium"):
        found = find()
    if not found and apt_install("Chromium", "chromium"):
        found = find()
    if not found:
        print(HOW_TO_GET_ONE)
        return 1
    print(f"Browser for the page's tests: {found}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
