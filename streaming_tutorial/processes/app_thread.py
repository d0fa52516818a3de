"""Serve an ASGI app (a FastAPI app a notebook cell defines) with uvicorn in a thread of this process.

    with AppInThread(app) as naive:
        httpx.post(naive.url_for("chat"), json=...)

A lesson defines a small app in a cell, where the learner reads it, and runs it beside the real processes. The
socket is bound before the thread starts (so the port is known and free), and `stop()` asks uvicorn to finish
its open requests and waits for the thread: nothing is left listening after the `with` block.
"""

from __future__ import annotations

import socket
import threading

import uvicorn

from streaming_tutorial.client.waiting import wait_until
from streaming_tutorial.processes.local_server import Endpoint

STARTUP_TIMEOUT = 30.0


class AppInThread(Endpoint):
    def __init__(self, app, host: str = "127.0.0.1") -> None:
        self.host, self.api_key = host, None
        self.socket = socket.socket()
        self.socket.bind((host, 0))
        self.port = self.socket.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True,
                                       name=f"app-on-{self.port}")

    def start(self) -> AppInThread:
        self.thread.start()
        wait_until(lambda: self.server.started or not self.thread.is_alive(), STARTUP_TIMEOUT,
                   what=f"the app on port {self.port} to start")
        if not self.server.started:
            raise RuntimeError(f"the app on port {self.port} did not start (see the error above)")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.socket.close()

    def __enter__(self) -> AppInThread:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
