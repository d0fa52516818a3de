"""Start the relay a learner copies (relay/relay.py) as a child process, in front of a vLLM server.

    with Relay(server.url, tokens=["alice", "bob"]) as relay:
        httpx.post(relay.url_for("chat"), headers=relay.headers, json={"messages": [...]})

It is a `LocalServer` with another command: its own process group, a log file, /health polled until it answers
200 (the relay's /health answers 200 only while its upstream does), and nothing left running after `stop()`.
"""

from __future__ import annotations

import sys

from streaming_tutorial.model import PROJECT_ROOT
from streaming_tutorial.processes.local_server import LOG_DIR, LocalServer

RELAY_SCRIPT = PROJECT_ROOT / "relay" / "relay.py"
RELAY_STARTUP_TIMEOUT = 60.0  # a Python process importing FastAPI: seconds, also on a busy machine


class Relay(LocalServer):
    """relay/relay.py on a free loopback port, in front of `upstream` (a vLLM server's URL, without /v1).
    `tokens` are its users' tokens (RELAY_TOKEN); `headers` carries the first; `vllm_api_key` is the relay's
    key for vLLM (VLLM_API_KEY), which no client of the relay ever sees."""

    def __init__(self, upstream: str, tokens: list[str] | tuple[str, ...] = ("learner",), args: list[str] = (),
                 *, vllm_api_key: str | None = None, name: str = "relay"):
        env = {"RELAY_TOKEN": ",".join(tokens), "VLLM_API_KEY": vllm_api_key or ""}
        super().__init__(args, command=[sys.executable, str(RELAY_SCRIPT), "--upstream", upstream], env=env,
                         startup_timeout=RELAY_STARTUP_TIMEOUT, log_path=LOG_DIR / f"{name}.log")
        self.tokens = list(tokens)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[0]}"}
