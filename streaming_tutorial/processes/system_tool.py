"""Install a missing system tool the way `make browser` and `make nginx` do: as root, with Debian's apt-get.

    found = find() or (apt_install("nginx", "nginx") and find())
"""

from __future__ import annotations

import os
import shutil
import subprocess


def try_command(what: str, *command: str) -> bool:
    """Run `command` quietly after saying so ("No nginx yet; trying: ..."); True when it succeeded."""
    print(f"No {what} yet; trying:", " ".join(command), flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env).returncode == 0


def apt_install(what: str, package: str) -> bool:
    """`apt-get update`, then `apt-get install -y package`, where this is root on a machine with apt-get."""
    return (os.geteuid() == 0 and shutil.which("apt-get") is not None
            and try_command(what, "apt-get", "update") and try_command(what, "apt-get", "install", "-y", package))
